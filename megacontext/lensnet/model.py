"""LensNet: a small non-causal network that scores every working-context entry for refocusing.

Inputs (one batch of working contexts, padded to the longest):
- ``entries [B, E, d]``: each entry's vector in the base model's input-embedding space: the gist itself
  for LOD1/LOD2 entries, the norm-rescaled mean of the 32 token embeddings for an LOD0 block;
- ``levels [B, E]`` (0, 1, 2) and ``ages [B, E]`` (tokens from the entry's centre to the end of the
  history, >= 0), ``entry_mask [B, E]`` (False on padding);
- ``tail [B, T, d]`` with ``tail_mask [B, T]``: embeddings of the most recent tokens, standing for "what
  the base model is reading now" (the query of a QMSum question lands here);
- optionally ``lexical [B, E, 3]`` (config ``lexical_features = 3``): each entry's BM25 match against the
  tail (:mod:`megacontext.lensnet.lexfeat`), projected and added to the entry's input. Checkpoints made
  without it have ``lexical_features = 0`` (the field's default), build no projection and load as before.

Output: ``scores [B, E]`` float32, signed: positive asks for more detail (expand), negative offers the
entry's detail up (collapse); padding scores are exactly 0.

Design choices
- Sizes come from the base model (``width = width_mult * d_model``), so one config serves any base; inputs
  are RMS-normalised first, so the base's embedding scale does not matter.
- Each layer runs *dual cross-attention*: the tail reads the entries (what in memory relates to the present),
  then the entries read the updated tail (how relevant am I to the present), then the entries attend to each
  other (neighbours, and whether detail is already present elsewhere), then per-token MLPs.
- Ages enter as log-scaled sinusoidal features, because useful recency resolution is relative: 100 vs 200
  tokens matters as much as 10k vs 20k.
- The score head's last layer starts at zero, so an untrained LensNet is neutral (all scores 0) rather than
  random, and the allocator then falls back to its recency behaviour.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megacontext.core.checkpoint import load_checkpoint, save_checkpoint
from megacontext.core.config import Config, check
from megacontext.core.layers import SwiGLU
from megacontext.core.lod import NET_LEVELS

if TYPE_CHECKING:
    from megacontext.base import FrozenBase

log = logging.getLogger(__name__)

KIND = "lensnet"
_MAX_AGE = 1 << 20  # ages beyond ~1M tokens share the top feature value


@dataclass
class LensNetConfig(Config):
    layers: int = 2  # dual cross-attention layers
    heads: int = 4
    width_mult: float = 0.5  # width = width_mult * d_model, rounded to a multiple of heads
    mlp_mult: float = 2.0
    age_features: int = 8  # sinusoidal frequencies of log(1 + age)
    tail_tokens: int = 64  # most recent tokens the tail holds
    dropout: float = 0.0
    lexical_features: int = 0  # 0 = off; 3 = the BM25 feature of megacontext.lensnet.lexfeat per entry

    def __post_init__(self):
        check(self.layers >= 1, f"layers={self.layers} must be >= 1")
        check(self.heads >= 1, f"heads={self.heads} must be >= 1")
        check(self.width_mult > 0, f"width_mult={self.width_mult} must be > 0")
        check(self.mlp_mult > 0, f"mlp_mult={self.mlp_mult} must be > 0")
        check(self.age_features >= 1, f"age_features={self.age_features} must be >= 1")
        check(self.tail_tokens >= 1, f"tail_tokens={self.tail_tokens} must be >= 1")
        check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must lie in [0, 1)")
        check(self.lexical_features in (0, 3), f"lexical_features={self.lexical_features}; expected 0 (off) or 3")

    def width(self, d_model: int) -> int:
        return max(self.heads, int(round(self.width_mult * d_model / self.heads)) * self.heads)


def age_encoding(ages: Tensor, n_freq: int) -> Tensor:
    """ages [...] (tokens, >= 0) -> [..., 2 * n_freq + 1] features of log(1 + age), scaled to [0, 1]."""
    x = torch.log1p(ages.float().clamp(0, _MAX_AGE)) / math.log1p(_MAX_AGE)  # [...] in [0, 1]
    freqs = math.pi * (2.0 ** torch.arange(n_freq, device=ages.device, dtype=torch.float32))
    ang = x.unsqueeze(-1) * freqs  # [..., F]
    return torch.cat([x.unsqueeze(-1), ang.sin(), ang.cos()], dim=-1)


def key_attn_mask(key_mask: Tensor) -> Tensor:
    """[B, Tk] bool key mask -> [B, 1, 1, Tk] attention mask. A row with no valid key would give NaN, so it sees
    every key instead (its output is masked downstream)."""
    return (key_mask | ~key_mask.any(dim=1, keepdim=True))[:, None, None, :]


class _Attention(nn.Module):
    """Multi-head attention of queries ``x [B, Tq, w]`` over keys/values ``y [B, Tk, w]`` with a key mask."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, y: Tensor, attn_mask: Tensor) -> Tensor:
        """``attn_mask`` [B, 1, 1, Tk] bool from :func:`key_attn_mask` (made once per forward, shared by layers)."""
        b, tq, w = x.shape
        tk, hd = y.shape[1], w // self.heads
        q = self.q(x).view(b, tq, self.heads, hd).transpose(1, 2)  # [B, h, Tq, hd]
        k, v = self.kv(y).view(b, tk, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [B, h, Tk, hd] each
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(a.transpose(1, 2).reshape(b, tq, w))  # [B, Tq, w]


class _DualLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.n_tail, self.n_ent_x, self.n_ent_s = nn.RMSNorm(width), nn.RMSNorm(width), nn.RMSNorm(width)
        self.n_ent_kv, self.n_tail_kv = nn.RMSNorm(width), nn.RMSNorm(width)
        self.tail_reads = _Attention(width, heads, dropout)
        self.entries_read = _Attention(width, heads, dropout)
        self.entries_self = _Attention(width, heads, dropout)
        self.n_mlp_e, self.n_mlp_t = nn.RMSNorm(width), nn.RMSNorm(width)
        self.mlp_e, self.mlp_t = SwiGLU(width, hidden, dropout), SwiGLU(width, hidden, dropout)

    def forward(self, e: Tensor, t: Tensor, e_mask: Tensor, t_mask: Tensor, last: bool = False
                ) -> tuple[Tensor, Tensor]:
        """Masks as from :func:`key_attn_mask`. ``last``: the tail's MLP update is skipped, since nothing reads
        the tail after the last layer (the returned tail is then the attention-updated one)."""
        t = t + self.tail_reads(self.n_tail(t), self.n_ent_kv(e), e_mask)  # [B, T, w]
        e = e + self.entries_read(self.n_ent_x(e), self.n_tail_kv(t), t_mask)  # [B, E, w]
        h = self.n_ent_s(e)
        e = e + self.entries_self(h, h, e_mask)
        e = e + self.mlp_e(self.n_mlp_e(e))
        return e, (t if last else t + self.mlp_t(self.n_mlp_t(t)))


class LensNet(nn.Module):
    """Signed per-entry focus scores: ``forward(entries, levels, ages, entry_mask, tail, tail_mask) -> [B, E]``."""

    def __init__(self, cfg: LensNetConfig, d_model: int):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model={d_model} must be positive")
        width = cfg.width(d_model)
        hidden = int(cfg.mlp_mult * width)
        self.cfg, self.d_model = cfg, d_model
        n_age = 2 * cfg.age_features + 1
        self.in_norm = nn.RMSNorm(d_model, elementwise_affine=False)
        self.entry_in = nn.Linear(d_model, width)
        self.tail_in = nn.Linear(d_model, width)
        self.level_embed = nn.Embedding(NET_LEVELS + 1, width)  # LOD0..2; coarser levels read as LOD2
        self.entry_age = nn.Linear(n_age, width)
        self.lex_in = nn.Linear(cfg.lexical_features, width) if cfg.lexical_features else None
        self.tail_age = nn.Linear(n_age, width)
        self.layers = nn.ModuleList(_DualLayer(width, cfg.heads, hidden, cfg.dropout) for _ in range(cfg.layers))
        self.head_norm = nn.RMSNorm(width)
        self.head_hidden = nn.Linear(width, width)
        self.head_out = nn.Linear(width, 1)
        nn.init.normal_(self.level_embed.weight, std=0.02)
        nn.init.zeros_(self.head_out.weight)  # untrained == neutral (see module docstring)
        nn.init.zeros_(self.head_out.bias)
        self._tail_feat: tuple | None = None  # (shape key, features) of the last tail (see _tail_age_features)

    def _tail_age_features(self, b: int, t: int, dev: torch.device, dt: torch.dtype) -> Tensor:
        """Age features [B, T, F] of the tail's slots (the last slot is the newest token, age 0). They depend on
        the shape only, so the last ones are kept: one focus round after another reads the same tail length."""
        key = (b, t, dev, dt)
        if self._tail_feat is None or self._tail_feat[0] != key:
            tail_ages = (t - 1 - torch.arange(t, device=dev)).expand(b, t)  # [B, T]
            self._tail_feat = (key, age_encoding(tail_ages, self.cfg.age_features).to(dt))
        return self._tail_feat[1]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dead_parameters(self) -> list[nn.Parameter]:
        """Parameters that cannot influence the scores: the last layer's tail update feeds nothing. They stay
        in the module for checkpoint compatibility; trainers freeze them so DDP finds no unused parameters."""
        last = self.layers[-1]
        return [*last.n_mlp_t.parameters(), *last.mlp_t.parameters()]

    def forward(self, entries: Tensor, levels: Tensor, ages: Tensor, entry_mask: Tensor, tail: Tensor,
                tail_mask: Tensor | None = None, lexical: Tensor | None = None) -> Tensor:
        if entries.dim() != 3 or entries.shape[-1] != self.d_model:
            raise ValueError(f"entries must be [B, E, {self.d_model}], got {tuple(entries.shape)}")
        if tail.dim() != 3 or tail.shape[-1] != self.d_model or tail.shape[0] != entries.shape[0]:
            raise ValueError(f"tail must be [{entries.shape[0]}, T, {self.d_model}], got {tuple(tail.shape)}")
        if levels.shape != entries.shape[:2] or ages.shape != entries.shape[:2] or entry_mask.shape != levels.shape:
            raise ValueError(f"levels/ages/entry_mask must be {tuple(entries.shape[:2])}, got "
                             f"{tuple(levels.shape)}/{tuple(ages.shape)}/{tuple(entry_mask.shape)}")
        dt = self.entry_in.weight.dtype
        dev = self.entry_in.weight.device
        entries, tail = entries.to(dev, dt), tail.to(dev, dt)
        levels, ages, entry_mask = levels.to(dev), ages.to(dev), entry_mask.to(dev, torch.bool)
        b, t = tail.shape[:2]
        if tail_mask is None:
            tail_mask = torch.ones(b, t, dtype=torch.bool, device=dev)
        tail_mask = tail_mask.to(dev, torch.bool)
        e = (self.entry_in(self.in_norm(entries)) + self.level_embed(levels.clamp(0, NET_LEVELS))
             + self.entry_age(age_encoding(ages, self.cfg.age_features).to(dt)))  # [B, E, w]
        if self.lex_in is not None:  # absent features (e.g. a source without an index) read as "no match"
            lex = lexical if lexical is not None else entries.new_zeros(*entries.shape[:2], self.cfg.lexical_features)
            if lex.shape != (*entries.shape[:2], self.cfg.lexical_features):
                raise ValueError(f"lexical must be [B, E, {self.cfg.lexical_features}], got {tuple(lex.shape)}")
            e = e + self.lex_in(lex.to(dev, dt))  # [B, E, w]
        h = self.tail_in(self.in_norm(tail)) + self.tail_age(self._tail_age_features(b, t, dev, dt))  # [B, T, w]
        e_attn, t_attn = key_attn_mask(entry_mask), key_attn_mask(tail_mask)  # made once, read by every layer
        for i, layer in enumerate(self.layers):
            e, h = layer(e, h, e_attn, t_attn, last=i == len(self.layers) - 1)
        s = self.head_out(F.silu(self.head_hidden(self.head_norm(e)))).squeeze(-1).float()  # [B, E]
        return s.masked_fill(~entry_mask, 0.0)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, base: FrozenBase, extra: dict | None = None) -> Path:
        return save_checkpoint(directory, self, kind=KIND, config=self.cfg.to_dict(),
                               base_fingerprint=base.fingerprint, d_model=base.d_model, extra=extra)

    @classmethod
    def load(cls, directory: str | Path, base: FrozenBase | None = None, d_model: int | None = None
             ) -> tuple[LensNet, dict]:
        """Load a checkpoint (refusing one made for another base model); returns (net, meta)."""
        state, meta = load_checkpoint(directory, kind=KIND, base_fingerprint=base.fingerprint if base else None,
                                      d_model=base.d_model if base else d_model)
        net = cls(LensNetConfig.from_dict(meta["config"]), int(meta["d_model"]))
        net.load_state_dict(state)
        if base is not None:
            net = net.to(base.device)
        log.info("loaded LensNet %s (%d params, step %s)", directory, net.num_params(), meta.get("step", "?"))
        return net.eval(), meta
