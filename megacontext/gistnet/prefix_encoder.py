"""A GistNet trunk made of the base model's own first layers (``GistNetConfig.encoder = "base"``).

Why: a small encoder trained from scratch has to learn what a phrase means before it can say it in one
vector; the frozen base already knows. Here the encoder is a trainable copy of the base's first ``layers``
decoder layers (and its final norm), initialised from the base's weights, reading the 32 inputs followed by
one gist slot; the slot's last hidden state becomes the gist. This is the ICAE / 500xCompressor shape
(the LM itself, with memory slots appended, encodes its context), cut to a prefix of the layers so the
encoder stays a fraction of the base's cost.

Invariants
- The copy is built with ``AutoModel.from_config`` from the base's config with ``num_hidden_layers`` set,
  and driven only through its public arguments (``inputs_embeds``, ``position_ids``); no modeling file is
  forked, so any HF causal LM whose backbone takes ``inputs_embeds`` works.
- The copy's input embedding table is replaced by a 1-row frozen placeholder: the encoder reads vectors
  (token embeddings at LOD1, LOD1 gists at LOD2), never ids, and the checkpoint stays small.
- Positions are ``0..32`` within the block, so a gist still depends only on its own span.
- The frozen base is untouched: weights are *copied* (:meth:`BasePrefixTrunk.init_from`), gradients flow
  into the copy only.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import Tensor, nn

from megacontext.core.layers import SwiGLU, mean_pool_head
from megacontext.core.lod import BLOCK

log = logging.getLogger(__name__)


def _truncated_config(base_config, layers: int):
    total = getattr(base_config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ValueError(f"base config {type(base_config).__name__} has no integer num_hidden_layers; "
                         "the 'base' GistNet encoder needs it")
    if not 1 <= layers <= total:
        raise ValueError(f"layers={layers}: the 'base' encoder copies 1..{total} of the base's {total} layers")
    cfg = copy.deepcopy(base_config)
    cfg.num_hidden_layers = layers
    if hasattr(cfg, "layer_types") and isinstance(cfg.layer_types, list):  # per-layer attention kinds
        cfg.layer_types = cfg.layer_types[:layers]
    cfg.use_cache = False
    return cfg


class BasePrefixTrunk(nn.Module):
    """x [n, 32, d] + level vector [n, d] -> [n, d]: the copied layers read the inputs and one gist slot."""

    def __init__(self, d_model: int, layers: int, base_config, mlp_mult: float = 2.0, dropout: float = 0.0):
        super().__init__()
        from transformers import AutoModel

        cfg = _truncated_config(base_config, layers)
        self.body = AutoModel.from_config(cfg, dtype=torch.float32)
        self.body.set_input_embeddings(nn.Embedding(1, d_model))  # placeholder: inputs are vectors
        self.body.get_input_embeddings().requires_grad_(False)
        self.slot = nn.Parameter(torch.randn(d_model) / math.sqrt(d_model))
        self.norm_out = nn.RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, int(mlp_mult * d_model), dropout)
        self.out, self.skip = mean_pool_head(d_model, d_model)  # untrained trunk == mean pooling
        self.register_buffer("positions", torch.arange(BLOCK + 1), persistent=False)

    @torch.no_grad()
    def init_from(self, base_model: nn.Module, input_scale: float | None = None) -> None:
        """Copy the base's first layers (and final norm) into the trunk; ``input_scale`` (the base's mean
        embedding norm) sets the slot to that norm so it starts at the scale of a token."""
        src = base_model.base_model.state_dict()
        dst = self.body.state_dict()
        emb = {k for k in dst if k.startswith(self._embed_prefix())}
        copied = {k: src[k].to(dst[k].dtype) for k in dst if k not in emb and k in src and src[k].shape == dst[k].shape}
        missing = sorted(set(dst) - set(copied) - emb)
        if missing:
            raise ValueError(f"the base's backbone has no weights for {missing[:5]}: cannot initialise the 'base' "
                             "GistNet encoder from it")
        self.body.load_state_dict({**dst, **copied})
        if input_scale is not None:
            self.slot.mul_(input_scale / self.slot.norm().clamp_min(1e-6))
        log.info("GistNet 'base' encoder initialised from %d tensors of the base's first layers", len(copied))

    def _embed_prefix(self) -> str:
        emb = self.body.get_input_embeddings()
        return next(name for name, mod in self.body.named_modules() if mod is emb)

    def forward(self, x: Tensor, level_vec: Tensor, cos=None, sin=None) -> Tensor:
        """Same call as the slot trunk's; ``cos`` / ``sin`` (its RoPE tables) are unused: the copied layers
        bring the base's own position encoding."""
        n, t, d = x.shape
        slot = (self.slot + level_vec).unsqueeze(1).to(x.dtype)  # [n, 1, d]
        seq = torch.cat([x, slot], dim=1)  # [n, 33, d]
        pos = self.positions[: t + 1].expand(n, -1)
        h = self.body(inputs_embeds=seq, position_ids=pos, use_cache=False).last_hidden_state[:, -1]  # [n, d]
        g = h + self.mlp(self.norm_out(h))
        return self.skip(x.mean(dim=1)) + self.out(g)  # [n, d]
