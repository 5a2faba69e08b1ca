"""Helpers for the tree tests: a small mean-pool compressor, a counting wrapper, token streams."""

from __future__ import annotations

import collections

import torch

from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig

D = 8
VOCAB = 64
FP = "fp-test"


class CountingCompressor:
    """Wraps a compressor and records how many rows each level compressed, per call."""

    def __init__(self, inner, version: str | None = None):
        self.inner, self.d_model = inner, inner.d_model
        self.version = version or inner.version
        self.calls: dict[int, list[int]] = collections.defaultdict(list)

    def embed(self, ids):
        return self.inner.embed(ids)

    def compress(self, x, level):
        self.calls[level].append(x.shape[0])
        return self.inner.compress(x, level)


def make_compressor(seed: int = 0, d: int = D) -> MeanPoolCompressor:
    g = torch.Generator().manual_seed(seed)
    return MeanPoolCompressor(torch.randn(VOCAB, d, generator=g))


def stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def new_tree(path, compressor=None, batch_blocks: int = 64, durable: bool = False, **kw) -> MegaContextTree:
    """A fresh store; no time- or size-driven flushes, so its write sequence is a function of the calls alone."""
    compressor = compressor or make_compressor()
    cfg = TreeConfig(batch_blocks=batch_blocks, durable=durable, commit_tokens=10**12, commit_seconds=float("inf"))
    return MegaContextTree.create(path, compressor.d_model, FP, compressor, config=cfg, **kw)
