"""GistCompressor: a trained GistNet seen through the tree's compressor protocol.

Implements :class:`megacontext.tree.compressor.Compressor` structurally (``version``, ``d_model``, ``embed``,
``compress``): the tree (a lower layer) is handed it and never imports a network.

Invariants
- ``version`` = ``gistnet-v1:<LOD1 weights hash>[:<level-2 mode>][:<LOD1 inputs>]``: any change of weights,
  level-2 source or inputs changes it, so the tree never mixes gists of two compressors.
- Rows are independent (GistNet has no cross-row operation), as the batching contract requires.
- Level 2 comes from a stacked LOD2 checkpoint, the checkpoint's own (jointly trained) level 2, or mean
  pooling of LOD1 gists for checkpoints trained for LOD1 only (:mod:`megacontext.gistnet.levels`);
  :meth:`GistCompressor.load` picks in that order. The choice is part of ``version``. Levels above 2 are
  mean-pooled unless the pair carries nets trained for them (then they are part of ``version`` too).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from megacontext.base import FrozenBase
from megacontext.gistnet.levels import TwoLevelGist
from megacontext.gistnet.model import GistNet


class GistCompressor:
    """``gistnet``: a GistNet (``level2`` says whether its own level-2 path or mean pooling makes LOD2) or a
    :class:`TwoLevelGist` pair (``level2`` ignored)."""

    def __init__(self, gistnet: GistNet | TwoLevelGist, base: FrozenBase,
                 level2: Literal["gistnet", "meanpool"] = "gistnet"):
        if gistnet.d_model != base.d_model:
            raise ValueError(f"GistNet d_model={gistnet.d_model} does not match the base model's {base.d_model}")
        if isinstance(gistnet, GistNet):
            if level2 not in ("gistnet", "meanpool"):
                raise ValueError(f"level2={level2!r} must be 'gistnet' or 'meanpool'")
            gistnet = TwoLevelGist(gistnet, gistnet if level2 == "gistnet" else None)
        self.net = gistnet.to(base.device).eval()
        self.base = base
        self.d_model = base.d_model
        suffix = self.net.level2_tag()
        if gistnet.cfg.inputs != "embeddings":
            suffix += f":{gistnet.cfg.inputs}{gistnet.cfg.input_layer}"
        self.version = f"gistnet-v1:{gistnet.lod1.weights_hash()}{suffix}"

    @classmethod
    def load(cls, directory: str, base: FrozenBase, lod2: str | None = None) -> GistCompressor:
        """LOD1 from ``directory``; LOD2 from the stacked checkpoint ``lod2``, else the checkpoint's own level 2
        when it was trained, else mean pooling (see :mod:`megacontext.gistnet.levels`)."""
        return cls(TwoLevelGist.load(directory, base, lod2), base)

    @torch.no_grad()
    def embed(self, ids: Tensor) -> Tensor:
        """ids [n, 32] -> what GistNet reads for LOD1 [n, 32, d] (token embeddings or base hidden states)."""
        return self.net.lod1_inputs(self.base, ids)

    @torch.no_grad()
    def compress(self, x: Tensor, level: int) -> Tensor:
        """x [n, 32, d] -> gists [n, d] float32 on the GistNet's device (levels above 2: see
        :mod:`megacontext.gistnet.levels`)."""
        return self.net(x.to(self.net.embed_norm.device).float(), level)
