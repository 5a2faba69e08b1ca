"""Training/eval windows drawn from a token cache: ``context`` tokens then a ``horizon`` of ``H`` tokens.

Invariants
- A window lies inside one document (never crosses a boundary) and starts at a block-aligned offset within
  it (a multiple of 32), so the context tiles into whole 32-token blocks exactly as the MegaContext tree does.
  Documents shorter than ``context + horizon`` give no windows at that size.
- Train/val is split *by document*: a document is val iff ``sha256(doc_id)`` mapped to [0, 1) is below
  ``val_fraction``. The split depends only on the doc id and fraction (not the seed, cache order or other
  documents), so it is stable as corpora grow.
- The candidate windows are all (document, block offset) pairs of the split; the stream samples them
  uniformly (so long documents weigh in proportion to their length) with ``np.random.default_rng([seed, rank])``.
  :meth:`WindowSampler.shard` gives rank ``r`` of ``W`` the candidates whose global number is ``r`` mod ``W``:
  disjoint, deterministic, and together the full set.
- ``batches(B)`` yields the same windows as iteration, in order, grouped ``B`` at a time, gathered from the
  memmap with one vectorised fancy index per batch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK
from megacontext.data.token_cache import TokenCache

log = logging.getLogger(__name__)

_CHUNK = 4096  # window indices drawn per RNG call


def val_score(doc_id: str) -> float:
    """Deterministic position of ``doc_id`` in [0, 1); val documents are those below ``val_fraction``."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def doc_split(doc_id: str, val_fraction: float) -> str:
    return "val" if val_score(doc_id) < val_fraction else "train"


@dataclass
class WindowConfig(Config):
    context: int = 1024  # tokens before the horizon; a multiple of the 32-token block
    horizon: int = 64  # tokens scored after the context
    seed: int = 0
    split: Literal["train", "val", "all"] = "train"
    val_fraction: float = 0.05
    domains: tuple[str, ...] | None = None  # None = every domain in the cache

    def __post_init__(self):
        check(self.context > 0 and self.context % BLOCK == 0,
              f"context must be a positive multiple of {BLOCK}, got {self.context}")
        check(self.horizon > 0, f"horizon must be positive, got {self.horizon}")
        check(self.split in ("train", "val", "all"), f"split must be 'train', 'val' or 'all', got {self.split!r}")
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.domains is not None:
            self.domains = tuple(self.domains)
            check(len(self.domains) > 0, "domains must be None (all) or a non-empty list")

    @property
    def length(self) -> int:
        return self.context + self.horizon


@dataclass
class Window:
    tokens: np.ndarray  # [context + horizon], int64 copy
    doc_index: int  # index into the cache
    start: int  # offset of tokens[0] within the document; a multiple of 32
    domain: str


class Batch(NamedTuple):
    tokens: torch.Tensor  # [B, context + horizon] int64
    domains: list[str]  # [B]


class WindowSampler:
    """Deterministic block-aligned windows of one split of a :class:`TokenCache` (optionally one DDP shard)."""

    def __init__(self, cache: TokenCache, cfg: WindowConfig | None = None, rank: int = 0, world_size: int = 1):
        cfg = cfg or WindowConfig()
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cache, self.cfg, self.rank, self.world_size = cache, cfg, rank, world_size
        domains = np.asarray(cache.doc_domains, dtype=object)
        keep = np.ones(cache.num_docs, dtype=bool)
        if cfg.domains is not None:
            unknown = sorted(set(cfg.domains) - set(cache.doc_domains))
            if unknown:
                raise ValueError(f"domain(s) {unknown} not in cache {cache.path}; it has {sorted(set(domains))}")
            keep &= np.isin(domains, list(cfg.domains))
        if cfg.split != "all":
            keep &= np.asarray([doc_split(d, cfg.val_fraction) == cfg.split for d in cache.doc_ids], dtype=bool)
        in_split = int(keep.sum())
        keep &= cache.doc_lengths >= cfg.length
        self.doc_indices = np.flatnonzero(keep)  # [D] cache indices of usable documents
        # block offsets 0, 32, ..., the last start that leaves room for context + horizon
        n_pos = (cache.doc_lengths[self.doc_indices] - cfg.length) // BLOCK + 1  # [D]
        self._first = np.concatenate([[0], np.cumsum(n_pos)[:-1]]).astype(np.int64)  # [D] global number of offset 0
        self.total_windows = int(n_pos.sum())
        # this shard owns global numbers rank, rank + W, rank + 2W, ...
        self.num_windows = max(0, (self.total_windows - rank + world_size - 1) // world_size)
        if self.num_windows == 0:
            raise ValueError(
                f"no windows of {cfg.context}+{cfg.horizon} tokens for split={cfg.split!r} domains={cfg.domains} "
                f"(rank {rank}/{world_size}): {in_split} document(s) in the split, {len(self.doc_indices)} long "
                f"enough, {self.total_windows} window(s) in all; use a smaller context/horizon or other data")
        log.debug("%d windows over %d documents (rank %d/%d)", self.num_windows, len(self.doc_indices),
                  rank, world_size)

    def shard(self, rank: int, world_size: int) -> WindowSampler:
        """The sampler of DDP rank ``rank``: a disjoint deterministic subset of this sampler's windows."""
        if self.world_size != 1:
            raise ValueError(f"this sampler is already shard {self.rank}/{self.world_size}; shard the unsharded one")
        return WindowSampler(self.cache, self.cfg, rank, world_size)

    # ------------------------------------------------------------- addressing
    def locate(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard-local window numbers -> (cache doc index, block-aligned start within the doc), both [N]."""
        local = np.asarray(local, dtype=np.int64)
        if local.size and (local.min() < 0 or local.max() >= self.num_windows):
            raise IndexError(f"window numbers must be in [0, {self.num_windows}), got {local.min()}..{local.max()}")
        glob = local * self.world_size + self.rank  # [N]
        slot = np.searchsorted(self._first, glob, side="right") - 1  # [N] position in doc_indices
        return self.doc_indices[slot], (glob - self._first[slot]) * BLOCK

    def gather(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens ``[N, context + horizon]`` (int64), doc indices ``[N]`` and starts ``[N]`` of windows ``local``."""
        docs, starts = self.locate(local)
        first = self.cache.doc_starts[docs] + starts  # [N] global token offset
        idx = first[:, None] + np.arange(self.cfg.length, dtype=np.int64)[None, :]  # [N, L]
        return np.asarray(self.cache.tokens[idx], dtype=np.int64), docs, starts

    # -------------------------------------------------------------- streams
    def _index_stream(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, self.rank])
        while True:
            yield rng.integers(0, self.num_windows, size=_CHUNK, dtype=np.int64)

    def __iter__(self) -> Iterator[Window]:
        """Endless seeded stream of windows, uniform over this shard's candidates (with replacement)."""
        for chunk in self._index_stream():
            docs, starts = self.locate(chunk)
            first = self.cache.doc_starts[docs] + starts
            for d, s, f in zip(docs.tolist(), starts.tolist(), first.tolist(), strict=True):
                yield Window(np.asarray(self.cache.tokens[f:f + self.cfg.length], dtype=np.int64), d, s,
                             self.cache.doc_domains[d])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Endless stream of ``Batch(tokens [B, context + horizon], domains)``; the windows of ``iter(self)``."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        buf = np.zeros(0, dtype=np.int64)
        for chunk in self._index_stream():
            buf = np.concatenate([buf, chunk])
            while len(buf) >= batch_size:
                take, buf = buf[:batch_size], buf[batch_size:]
                tokens, docs, _ = self.gather(take)
                yield Batch(torch.from_numpy(tokens), [self.cache.doc_domains[d] for d in docs.tolist()])

    def sample(self, n: int) -> list[Window]:
        """A fixed set of ``n`` distinct windows (sorted by position) for evaluation; fewer if fewer exist."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if n > self.num_windows:
            log.warning("asked for %d windows, only %d exist; returning all", n, self.num_windows)
            n = self.num_windows
        rng = np.random.default_rng([self.cfg.seed, self.rank, 1])  # independent of the training stream
        local = np.sort(rng.choice(self.num_windows, size=n, replace=False))
        tokens, docs, starts = self.gather(local)
        return [Window(t, d, s, self.cache.doc_domains[d])
                for t, d, s in zip(tokens, docs.tolist(), starts.tolist(), strict=True)]

    def __repr__(self) -> str:
        return (f"WindowSampler(split={self.cfg.split!r}, windows={self.num_windows}, docs={len(self.doc_indices)}, "
                f"rank={self.rank}/{self.world_size})")
