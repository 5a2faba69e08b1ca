"""GistNet: compress 32 vectors of the base model's embedding space into one vector of that space.

Invariants
- Input ``x [n, 32, d]``: token embeddings (producing an LOD1 gist) or 32 LOD1 gists (producing LOD2).
  Output ``[n, d]`` in the same space, every row with L2 norm ``embed_norm`` (the base model's mean
  input-embedding norm), so the base model sees gists at the scale of the tokens it was trained on
  (``learn_gain`` lets training rescale that norm by a learned per-level factor in [e^-2, e^2]).
- Sizes come from the base model at construction (``d_model``, ``embed_norm``); the config holds only
  relative choices (layers, heads, width multiplier), so one config serves any base model.
- ``level`` is the LOD of the gist being produced (1 or 2). With ``shared_levels`` one trunk serves both
  levels and a learned level embedding tells them apart; otherwise each level has its own trunk.
- What an LOD1 gist reads is :meth:`GistNet.lod1_inputs` (the one place it is formed): the block's token
  embeddings (``inputs="embeddings"``), or the frozen base model's hidden states of the block read on its own
  (``inputs="hidden"``, positions 0..31, layer ``input_layer``). Either way a gist depends only on the tokens
  of its own span, the tree's invariant. LOD2 always reads 32 LOD1 gists.

Design choices
- Bidirectional pre-norm transformer blocks with RoPE over the 32 slots: the order inside a block
  matters (it is text), and RoPE gives it without a learned position table.
- Pooling is a learned slot query that cross-attends over the 32 encoded slots, then a residual MLP.
- The output adds the (projected) mean of the inputs as a skip path, and the output projection starts
  at zero, so an untrained GistNet is exactly the mean-pooling baseline; training only has to improve on
  it, which makes early steps stable and the gap to "mean pooling" directly visible.
- ``inputs="hidden"`` lets the frozen base model itself do the reading (the idea behind Activation Beacon
  and ICAE-style encoders: a 5M-parameter net cannot know what the base model knows about a phrase). It costs
  one no-grad base forward per 32-token block at ingest, i.e. about one extra base-model pass over the
  history, and needs no gradient through that pass.
- ``encoder="base"`` swaps the trunk for a trainable copy of the base's first ``layers`` layers
  (:mod:`megacontext.gistnet.prefix_encoder`); same output head, so it also starts as mean pooling. Measured
  in docs/results/gistnet_v2.md (round 4): no better than the slot trunk so far, kept as an option.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megacontext.core.checkpoint import load_checkpoint, save_checkpoint
from megacontext.core.config import Config, check
from megacontext.core.layers import SwiGLU, mean_pool_head
from megacontext.core.lod import BLOCK, NET_LEVELS

if TYPE_CHECKING:
    from megacontext.base import FrozenBase

log = logging.getLogger(__name__)

KIND = "gistnet"


@dataclass
class GistNetConfig(Config):
    layers: int = 3  # encoder blocks over the 32 slots
    heads: int = 4  # attention heads; width must be divisible and head_dim even (RoPE)
    width_mult: float = 1.0  # model width = round(width_mult * d_model) (rounded to a multiple of heads*2)
    mlp_mult: float = 2.0  # MLP hidden = mlp_mult * width
    shared_levels: bool = True  # one trunk + level embedding for LOD1 and LOD2, else one trunk per level
    rope_theta: float = 10000.0
    dropout: float = 0.0
    learn_gain: bool = False  # learn a per-level output scale exp(g) * embed_norm (g in [-2, 2], starts at 0)
    inputs: Literal["embeddings", "hidden"] = "embeddings"  # what LOD1 reads (see module docstring)
    input_layer: int = -1  # inputs="hidden": index into the base's hidden_states (0 = embeddings, -1 = last)
    # "slots": the small bidirectional trunk below; "base": a trainable copy of the base's first ``layers``
    # layers reading the inputs + one gist slot (gistnet.prefix_encoder; heads/width_mult do not apply)
    encoder: Literal["slots", "base"] = "slots"

    def __post_init__(self):
        check(self.encoder in ("slots", "base"), f"encoder={self.encoder!r} must be 'slots' or 'base'")
        check(self.encoder == "slots" or self.layers >= 1,
              f"layers={self.layers}: encoder='base' copies at least one of the base's layers")
        check(self.inputs in ("embeddings", "hidden"), f"inputs={self.inputs!r} must be 'embeddings' or 'hidden'")
        check(self.layers >= 0, f"layers={self.layers} must be >= 0")
        check(self.heads >= 1, f"heads={self.heads} must be >= 1")
        check(self.width_mult > 0, f"width_mult={self.width_mult} must be > 0")
        check(self.mlp_mult > 0, f"mlp_mult={self.mlp_mult} must be > 0")
        check(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must lie in [0, 1)")

    def width(self, d_model: int) -> int:
        unit = 2 * self.heads
        return max(unit, int(round(self.width_mult * d_model / unit)) * unit)


def unwrap(model: nn.Module) -> GistNet:
    """The GistNet inside a DDP and/or ``torch.compile`` wrapper (or the net itself)."""
    while not isinstance(model, GistNet):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} is not a GistNet nor a wrapper of one")
        model = inner
    return model


def _rope_tables(n: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # [n, head_dim/2]
    return ang.cos(), ang.sin()


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [n, h, T, hd]; rotate pairs (first half, second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    """Pre-norm bidirectional self-attention + SwiGLU MLP."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.RMSNorm(width)
        self.mlp = SwiGLU(width, hidden, dropout)
        self.dropout = dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)  # [n, h, T, hd]
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, w))  # [n, T, w]
        return x + self.mlp(self.norm2(x))


class _Trunk(nn.Module):
    """One level's compressor body: in-projection, blocks, slot-query pooling, residual MLP, out-projection."""

    def __init__(self, d_model: int, cfg: GistNetConfig):
        super().__init__()
        width = cfg.width(d_model)
        hidden = int(cfg.mlp_mult * width)
        self.heads = cfg.heads
        self.inp = nn.Linear(d_model, width)
        self.blocks = nn.ModuleList(_Block(width, cfg.heads, hidden, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(width)
        self.query = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.kv = nn.Linear(width, 2 * width)
        self.pool_proj = nn.Linear(width, width)
        self.norm_out = nn.RMSNorm(width)
        self.mlp = SwiGLU(width, hidden, cfg.dropout)
        self.out, self.skip = mean_pool_head(width, d_model)

    def forward(self, x: Tensor, level_vec: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, t, _ = x.shape
        h = self.inp(x) + level_vec.unsqueeze(1)  # [n, 32, w]
        for blk in self.blocks:
            h = blk(h, cos, sin)
        h = self.norm(h)
        w = h.shape[-1]
        hd = w // self.heads
        k, v = self.kv(h).view(n, t, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [n, h, 32, hd]
        q = (self.query + level_vec).view(n, self.heads, 1, hd)  # [n, h, 1, hd]
        pooled = F.scaled_dot_product_attention(q, k, v).reshape(n, w)  # [n, w]
        g = self.pool_proj(pooled)
        g = g + self.mlp(self.norm_out(g))  # [n, w]
        return self.skip(x.mean(dim=1)) + self.out(g)  # [n, d]


class GistNet(nn.Module):
    """32 -> 1 compressor. ``forward(x [n, 32, d], level) -> [n, d]`` with row norms ``embed_norm``."""

    def __init__(self, cfg: GistNetConfig, d_model: int, embed_norm: float = 1.0, base_config=None):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model={d_model} must be positive")
        if not embed_norm > 0:
            raise ValueError(f"embed_norm={embed_norm} must be positive (the base model's mean embedding norm)")
        width = cfg.width(d_model)  # a multiple of 2 * heads, so the RoPE head_dim is even
        self.cfg = cfg
        self.d_model = d_model
        self.base_config = base_config
        n_trunks = 1 if cfg.shared_levels else NET_LEVELS
        if cfg.encoder == "base":
            if base_config is None:
                raise ValueError("GistNetConfig.encoder='base' needs the base model's config (base_config=...)")
            from megacontext.gistnet.prefix_encoder import BasePrefixTrunk

            width = d_model  # the slot and its level vector live in the base's embedding space
            self.trunks = nn.ModuleList(BasePrefixTrunk(d_model, cfg.layers, base_config, cfg.mlp_mult, cfg.dropout)
                                        for _ in range(n_trunks))
        else:
            self.trunks = nn.ModuleList(_Trunk(d_model, cfg) for _ in range(n_trunks))
        self.level_embed = nn.Embedding(NET_LEVELS, width)  # row level-1
        nn.init.normal_(self.level_embed.weight, std=0.02)
        self.register_buffer("embed_norm", torch.tensor(float(embed_norm)))
        self.log_gain = nn.Parameter(torch.zeros(NET_LEVELS), requires_grad=cfg.learn_gain)
        cos, sin = _rope_tables(BLOCK, width // cfg.heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, encoder_lr_mult: float = 1.0) -> list[dict]:
        """Optimizer groups: the copied pretrained layers (encoder='base') get ``lr_mult`` = encoder_lr_mult,
        everything else 1. Every parameter is listed (frozen ones get no gradient, AdamW skips them), so a 'slots'
        net has one group in ``parameters()`` order, as optimizer states saved before the groups existed."""
        body = {id(p) for t in self.trunks for p in getattr(t, "body", nn.Module()).parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in body], "lr_mult": 1.0},
                  {"params": [p for p in self.parameters() if id(p) in body], "lr_mult": encoder_lr_mult}]
        return [g for g in groups if g["params"]]

    def init_encoder_from(self, base: FrozenBase) -> None:
        """encoder='base': copy the base's first layers into every trunk (a fresh net's starting point)."""
        if self.cfg.encoder != "base":
            raise ValueError(f"init_encoder_from needs encoder='base', this net has encoder={self.cfg.encoder!r}")
        for trunk in self.trunks:
            trunk.init_from(base.model, input_scale=float(self.embed_norm))

    @torch.no_grad()
    def lod1_inputs(self, base: FrozenBase, ids: Tensor, chunk: int = 4096) -> Tensor:
        """ids [n, 32] -> what this net reads to make their LOD1 gists, [n, 32, d] on the base's device
        (base dtype). Hidden states are taken with each block read alone, ``chunk`` blocks per forward."""
        if ids.dim() != 2 or ids.shape[1] != BLOCK:
            raise ValueError(f"ids must be [n, {BLOCK}], got {tuple(ids.shape)}")
        if self.cfg.inputs == "embeddings":
            return base.embed(ids)
        ids = ids.to(base.device)
        pos = torch.arange(BLOCK, device=base.device)
        outs = []
        for i in range(0, ids.shape[0], chunk):
            part = ids[i:i + chunk]
            states = base.forward(base.embed(part), pos.expand(part.shape[0], -1), output_hidden_states=True,
                                  logits_to_keep=1).hidden_states
            if not -len(states) <= self.cfg.input_layer < len(states):
                raise ValueError(f"input_layer={self.cfg.input_layer} is out of range for a base model with "
                                 f"{len(states)} hidden states (embeddings + {len(states) - 1} layers)")
            outs.append(states[self.cfg.input_layer].to(base.dtype))  # [c, 32, d]
        return torch.cat(outs) if outs else base.embed(ids)

    def forward(self, x: Tensor, level: int | Tensor = 1) -> Tensor:
        """x [n, 32, d]; level an int in {1, 2} or a LongTensor [n] -> gists [n, d]."""
        if x.dim() != 3 or x.shape[1] != BLOCK or x.shape[2] != self.d_model:
            raise ValueError(f"GistNet expects x of shape [n, {BLOCK}, {self.d_model}], got {tuple(x.shape)}")
        n = x.shape[0]
        if isinstance(level, int):
            if not 1 <= level <= NET_LEVELS:
                raise ValueError(f"level={level} must be 1..{NET_LEVELS} (the LOD of the gist produced)")
            levels = torch.full((n,), level, dtype=torch.long, device=x.device)
        else:
            levels = level.to(device=x.device, dtype=torch.long).reshape(-1)
            if levels.shape[0] != n:
                raise ValueError(f"level tensor has {levels.shape[0]} entries, expected one per input row ({n})")
        x = x.to(self.level_embed.weight.dtype)
        idx = (levels - 1).clamp(0, NET_LEVELS - 1)  # out-of-range levels are the caller's bug, not a crash here
        lvec = self.level_embed(idx)  # [n, w]
        cos, sin = self.rope_cos, self.rope_sin
        if len(self.trunks) == 1:
            out = self.trunks[0](x, lvec, cos, sin)  # [n, d]
        else:
            # both trunks run on all rows and the level selects: no data-dependent shapes, no host sync
            outs = torch.stack([t(x, lvec, cos, sin) for t in self.trunks])  # [L, n, d]
            out = outs.gather(0, idx.view(1, n, 1).expand(1, n, outs.shape[-1])).squeeze(0)
        out = out.float()
        norm = self.embed_norm
        if self.cfg.learn_gain:
            norm = norm * self.log_gain[idx].clamp(-2.0, 2.0).exp().unsqueeze(-1)  # [n, 1]
        return out * (norm / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))  # [n, d]

    # ------------------------------------------------------------------ persistence
    def weights_hash(self) -> str:
        """Short hash of the exact weights: the version tag of gists this net produced."""
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path, base: FrozenBase, extra: dict | None = None,
             dtype: torch.dtype | None = None) -> Path:
        """Checkpoint for ``base``. ``dtype`` (e.g. bf16) stores a cast copy: half the bytes for shipping;
        loading casts back to float32, and ``weights_hash`` is that of the stored weights."""
        net = self
        if dtype is not None:
            net = GistNet(self.cfg, self.d_model, float(self.embed_norm), base_config=self.base_config)
            net.load_state_dict({k: v.to(dtype).to(v.dtype) for k, v in self.state_dict().items()})
            net.to(dtype)
        return save_checkpoint(directory, net, kind=KIND, config=self.cfg.to_dict(),
                               base_fingerprint=base.fingerprint, d_model=base.d_model,
                               extra={"weights_hash": net.weights_hash(), **(extra or {})})

    @classmethod
    def load(cls, directory: str | Path, base: FrozenBase) -> GistNet:
        """Load a checkpoint trained for ``base``; refuses one trained for another base model."""
        state, meta = load_checkpoint(directory, kind=KIND, base_fingerprint=base.fingerprint, d_model=base.d_model)
        cfg = GistNetConfig.from_dict(meta["config"])
        net = cls(cfg, base.d_model, embed_norm=float(state["embed_norm"]), base_config=base.config)
        state.setdefault("log_gain", torch.zeros(NET_LEVELS))  # checkpoints from before learn_gain existed
        net.load_state_dict(state)
        log.info("loaded GistNet %s (%d params, step %s)", directory, net.num_params(), meta.get("step", "?"))
        return net.to(base.device).eval()
