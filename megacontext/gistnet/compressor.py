"""GistCompressor: a trained GistNet seen through the tree's compressor protocol.

Implements :class:`megacontext.tree.compressor.Compressor` structurally (``version``, ``d_model``, ``embed``,
``compress``) without importing the tree, so gistnet and tree stay side by side in the layering.

Invariants
- ``version`` = ``gistnet-v1:<weights hash>[:<level-2 mode>]``: any change of weights (or of the level-2
  mode) changes it, so the tree never mixes gists of two compressors.
- Rows are independent (GistNet has no cross-row operation), as the batching contract requires.
- Level 2 may be delegated to mean pooling (``level2="meanpool"``) for checkpoints that were trained for
  LOD1 only: an untrained LOD2 head is no better than the baseline and costs compute.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from megacontext.base import FrozenBase
from megacontext.gistnet.model import GistNet


class GistCompressor:
    def __init__(self, gistnet: GistNet, base: FrozenBase, level2: Literal["gistnet", "meanpool"] = "gistnet"):
        if gistnet.d_model != base.d_model:
            raise ValueError(f"GistNet d_model={gistnet.d_model} does not match the base model's {base.d_model}")
        if level2 not in ("gistnet", "meanpool"):
            raise ValueError(f"level2={level2!r} must be 'gistnet' or 'meanpool'")
        self.net = gistnet.to(base.device).eval()
        self.base = base
        self.level2 = level2
        self.d_model = base.d_model
        suffix = "" if level2 == "gistnet" else ":l2mean"
        if gistnet.cfg.inputs != "embeddings":
            suffix += f":{gistnet.cfg.inputs}{gistnet.cfg.input_layer}"
        self.version = f"gistnet-v1:{gistnet.weights_hash()}{suffix}"

    @classmethod
    def load(cls, directory: str, base: FrozenBase, **kw) -> GistCompressor:
        return cls(GistNet.load(directory, base), base, **kw)

    @torch.no_grad()
    def embed(self, ids: Tensor) -> Tensor:
        """ids [n, 32] -> what GistNet reads for LOD1 [n, 32, d] (token embeddings or base hidden states)."""
        return self.net.lod1_inputs(self.base, ids)

    @torch.no_grad()
    def compress(self, x: Tensor, level: int) -> Tensor:
        """x [n, 32, d] -> gists [n, d] float32 on the GistNet's device."""
        if level not in (1, 2):
            raise ValueError(f"level={level}; gists exist at levels 1 and 2")
        x = x.to(self.net.embed_norm.device)
        if level == 2 and self.level2 == "meanpool":
            mean = x.float().mean(dim=1)  # [n, d]
            return mean * (self.net.embed_norm / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return self.net(x.float(), level)
