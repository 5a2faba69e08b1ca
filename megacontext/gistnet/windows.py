"""Window sources for GistNet training: a token cache (:mod:`megacontext.data`) or seeded random tokens.

Both expose the same two calls the loop needs: ``shard(rank, world)`` and ``batches(B)`` yielding
``LongTensor [B, context + horizon]``. Random tokens exist only for smoke runs and tests (no data on
disk); they carry no language signal, so no quality claim may rest on them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class RandomWindows:
    """Endless seeded uniform random token windows; shards draw from disjoint seeds."""

    def __init__(self, length: int, vocab_size: int, seed: int = 0, rank: int = 0):
        if length <= 0 or vocab_size <= 1:
            raise ValueError(f"need length > 0 and vocab_size > 1, got length={length}, vocab_size={vocab_size}")
        self.length, self.vocab_size, self.seed, self.rank = length, vocab_size, seed, rank

    def shard(self, rank: int, world: int) -> RandomWindows:
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        return RandomWindows(self.length, self.vocab_size, self.seed, rank)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_033 + self.rank)
        while True:
            yield torch.randint(0, self.vocab_size, (batch_size, self.length), generator=gen)


class CacheWindows:
    """Thin adapter over :class:`megacontext.data.windows.WindowSampler` yielding bare token tensors."""

    def __init__(self, sampler):
        self.sampler = sampler

    def shard(self, rank: int, world: int) -> CacheWindows:
        return self if world == 1 else CacheWindows(self.sampler.shard(rank, world))

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        for batch in self.sampler.batches(batch_size):
            yield batch.tokens


def open_windows(path: str, context: int, horizon: int, split: str, seed: int,
                 vocab_size: int) -> RandomWindows | CacheWindows:
    """``path`` = token cache directory, or "" for random tokens. ``split`` is train / val / all."""
    if not path:
        log.warning("no token cache given: using RANDOM tokens (smoke run; metrics mean nothing)")
        return RandomWindows(context + horizon, vocab_size, seed)
    from megacontext.data.token_cache import TokenCache
    from megacontext.data.windows import WindowConfig, WindowSampler

    cache = TokenCache.open(path)
    if cache.vocab_size > vocab_size:
        raise ValueError(f"token cache {path!r} has vocab_size={cache.vocab_size}, larger than the base model's "
                         f"{vocab_size}: it was made with another tokenizer")
    sampler = WindowSampler(cache, WindowConfig(context=context, horizon=horizon, seed=seed, split=split))
    log.info("%s windows from %s: %r", split, path, sampler)
    return CacheWindows(sampler)
