"""The compressor protocol the tree calls to make gists, and the mean-pool baseline compressor.

The tree never imports a network: it is handed any object with ``version``, ``d_model``, ``embed`` and ``compress``.
Level 1 compresses the token embeddings of one 32-token block; level ``l >= 2`` compresses 32 stored LOD``l-1``
gists (levels above 2 are mean-pooled by every compressor shipped, :func:`mean_pool`, unless a network trained for
that level is given). Gists are compared across runs by ``version``, so a compressor must change its version string
whenever its outputs change (new weights, new architecture); the tree refuses stores made by another version unless
asked to rebuild.
Batching contract: ``compress`` gets ``n`` independent rows at once and must treat them independently
(no cross-row normalisation), so the tree may batch blocks however it likes.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, MAX_LEVEL


@runtime_checkable
class Compressor(Protocol):
    version: str  # identifies the outputs; at most 64 UTF-8 bytes (stored in level-file headers)
    d_model: int

    def embed(self, ids: Tensor) -> Tensor:
        """ids [n, 32] int64 -> token embeddings [n, 32, d]."""
        ...

    def compress(self, x: Tensor, level: int) -> Tensor:
        """x [n, 32, d] (token embeddings at level 1, LOD``l-1`` gists at level ``l >= 2``) -> gists [n, d].

        Inputs of levels >= 2 arrive as float32 CPU tensors read from the store; move them to your device."""
        ...


def table_digest(table: Tensor) -> str:
    """Short hash of an embedding table's shape and evenly spaced values (as bf16), device/dtype independent."""
    flat = table.detach().reshape(-1)
    if flat.numel() > 4096:
        flat = flat[torch.linspace(0, flat.numel() - 1, 4096, device=flat.device).long()]
    h = hashlib.sha256(str(tuple(table.shape)).encode())
    h.update(flat.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def mean_pool(x: Tensor, target_norm: float | Tensor) -> Tensor:
    """x [n, 32, d] -> [n, d] float32: the mean of the 32 inputs rescaled to ``target_norm`` (averaging shrinks
    vectors, and the base model has only ever seen rows of its embedding table's norm)."""
    mean = x.float().mean(dim=1)  # [n, d]
    return mean * (target_norm / mean.norm(dim=-1, keepdim=True).clamp_min(1e-6))


class MeanPoolCompressor:
    """Untrained baseline: a gist is the mean of its 32 inputs, rescaled to the table's mean row norm.

    Averaging shrinks vectors (random directions cancel), and the base model has only ever seen rows of the
    embedding table, so each gist is put back on the typical row norm rather than left near the origin."""

    def __init__(self, embedding_table: Tensor | torch.nn.Embedding):
        table = embedding_table.weight if isinstance(embedding_table, torch.nn.Embedding) else embedding_table
        if table.dim() != 2:
            raise ValueError(f"embedding_table must be [vocab, d], got shape {tuple(table.shape)}")
        self.table = table.detach()
        self.d_model = int(table.shape[1])
        self.target_norm = float(self.table.float().norm(dim=-1).mean())
        self.version = f"meanpool-v1:{table_digest(self.table)}"

    @classmethod
    def from_base(cls, base) -> MeanPoolCompressor:
        """From a :class:`megacontext.base.FrozenBase` (its input embedding table)."""
        return cls(base.model.get_input_embeddings().weight)

    def embed(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.shape[1] != BLOCK:
            raise ValueError(f"ids must be [n, {BLOCK}], got {tuple(ids.shape)}")
        return self.table[ids.to(self.table.device)]  # [n, 32, d]

    def compress(self, x: Tensor, level: int) -> Tensor:
        if not 1 <= level <= MAX_LEVEL:
            raise ValueError(f"level={level}; gists exist at levels 1..{MAX_LEVEL}")
        if x.dim() != 3 or x.shape[1] != BLOCK or x.shape[2] != self.d_model:
            raise ValueError(f"x must be [n, {BLOCK}, {self.d_model}], got {tuple(x.shape)}")
        return mean_pool(x, self.target_norm)


@torch.no_grad()
def gists_of_blocks(compressor: Compressor, ids: Tensor) -> Tensor:
    """Level-1 gists of blocks: ids [n, 32] -> [n, d] float32 on CPU."""
    if ids.shape[0] == 0:
        return torch.empty(0, compressor.d_model)
    return compressor.compress(compressor.embed(ids), 1).float().cpu()


@torch.no_grad()
def gists_of_groups(compressor: Compressor, below: Tensor, level: int = 2) -> Tensor:
    """Gists of ``level >= 2``: below [32m, d] (LOD``level-1`` gists as stored) -> [m, d] float32 on CPU."""
    if level < 2:
        raise ValueError(f"level={level}; groups of gists make levels >= 2")
    if below.shape[0] % BLOCK:
        raise ValueError(f"level-{level} input must hold a multiple of {BLOCK} LOD{level - 1} gists, "
                         f"got {below.shape[0]}")
    if below.shape[0] == 0:
        return torch.empty(0, compressor.d_model)
    x = below.float().reshape(-1, BLOCK, below.shape[-1])  # [m, 32, d]
    return compressor.compress(x, level).float().cpu()
