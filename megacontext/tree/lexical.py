"""Lexical index of a history: an append-only inverted index over LOD0 token ids per 32-token block, BM25 scores.

Index model
- A *document* is one complete LOD0 block (32 token ids); a *term* is a token id. The partial tail is not
  indexed (it is not a block yet). Blocks are added strictly in order (``add(first_block, ids)`` must
  continue where the index ends), so the index is a prefix of LOD0: ``num_blocks`` blocks, ``[0, num_blocks)``.
- Postings live in immutable :class:`Segment` s, each covering a contiguous block range: ``terms [U]`` sorted
  unique ids, ``offsets [U + 1]``, and per posting ``blocks [P]`` (ascending within a term) and ``tf [P]``
  (occurrences of the term in the block, 1..32); ids and blocks (relative to the segment) are kept in the
  narrowest unsigned dtype their range allows (checked), so a posting costs 3-5 bytes. A new batch of
  blocks becomes a new segment; segments of very different size are merged (like an LSM tree: the newest
  two merge while the older holds less than ``fanout`` times the blocks of the newer), so a history of
  ``n`` blocks has at most ``log_fanout(n) + 1`` segments and each posting is rewritten O(log n) times in total.
- Queries cost O(segments * Q * log U + matches): for each segment the query terms are located by binary
  search and their posting ranges gathered with one vectorised range-gather; nothing scans the history.

BM25 (per block ``b``, query term ``q`` with document frequency ``df``, ``N`` indexed blocks)
  ``score(b) = sum_q w(qtf_q) * idf(q) * tf(q, b) (k1 + 1) / (tf(q, b) + k1)``
  ``idf(q) = log(1 + (N - df + 0.5) / (df + 0.5))`` (never negative), ``w(qtf) = qtf (k3 + 1) / (qtf + k3)``.
  Every block holds exactly 32 tokens, so BM25's length normalisation (``b``) is identically 1 and is left
  out. Terms occurring in more than ``max_df`` of the searched blocks (``the``, ``,``) are skipped before
  their postings are read (their df is known from the posting ranges): their idf is near zero and their
  postings are the only ones that grow with the history; terms in more than ``max_postings`` blocks are
  skipped as well, which bounds a query's work by ``Q * max_postings`` however long the history (on a
  long history such a term's idf is still ~log(N / max_postings), so little is lost). ``limit_block``
  restricts a query to a prefix
  ``[0, limit)`` (``N``, ``df`` and the cutoff then count that prefix only), so one index serves every prefix
  of its history and a reader at block ``limit`` is exactly causal.

Aggregation up the levels: an entry of LOD``l >= 1`` covers blocks ``[i * 32^(l-1), (i + 1) * 32^(l-1))``;
:func:`entry_scores` gives every working-context entry the max, the sum and the best block (argmax) of the
block scores under its span from the sparse (block, score) list by binary search, O(E log M + M). So an
LOD2 gist knows its best child, and an LOD3 its best block.

Persistence is :mod:`megacontext.tree.lexical_store` (segment files beside the level files, rebuildable
from LOD0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK


@dataclass
class BM25Config(Config):
    k1: float = 1.2  # term-frequency saturation
    k3: float = 8.0  # query-term-frequency saturation
    max_df: float = 0.05  # terms in more than this fraction of the indexed blocks are ignored (stop words)
    min_blocks_for_cutoff: int = 64  # below this many blocks the max_df cutoff is off (df is too noisy)
    max_postings: int = 8192  # terms in more blocks than this are skipped too: a query reads <= Q * this postings
    fanout: int = 4  # each segment holds >= fanout times the blocks of the next newer one (else they merge)

    def __post_init__(self):
        check(self.k1 >= 0, f"k1={self.k1} must be >= 0")
        check(self.k3 >= 0, f"k3={self.k3} must be >= 0")
        check(0 < self.max_df <= 1, f"max_df={self.max_df} must lie in (0, 1]")
        check(self.min_blocks_for_cutoff >= 0, f"min_blocks_for_cutoff={self.min_blocks_for_cutoff} must be >= 0")
        check(self.fanout >= 2, f"fanout={self.fanout} must be >= 2")
        check(self.max_postings >= 1, f"max_postings={self.max_postings} must be >= 1")


def uint_dtype(max_value: int) -> np.dtype:
    """The narrowest unsigned dtype (uint16, uint32, else int64) holding ``0..max_value``."""
    for dt in (np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


@dataclass(frozen=True)
class Segment:
    """Immutable postings of blocks ``[first, end)`` (see module docstring). Arrays may be memory maps (read only).

    Stored narrow: ``terms`` in :func:`uint_dtype` of the largest id, ``blocks`` as ``block - base`` in
    :func:`uint_dtype` of the segment's size (``base == first``; 0 for format-1 files, which hold int64 block
    ids), so a posting costs 3 or 5 bytes instead of 9."""

    first: int
    end: int
    terms: np.ndarray  # [U] sorted unique, uint16 / uint32 / int64
    offsets: np.ndarray  # int64 [U + 1]
    blocks: np.ndarray  # [P] block - base, ascending within a term, uint16 / uint32 / int64
    tf: np.ndarray  # uint8 [P]
    base: int = 0  # global block id = blocks + base

    @property
    def num_blocks(self) -> int:
        return self.end - self.first

    @property
    def num_postings(self) -> int:
        return int(self.blocks.shape[0])

    @classmethod
    def from_sorted(cls, first: int, end: int, term: np.ndarray, blocks: np.ndarray, tf: np.ndarray) -> Segment:
        """A segment from postings sorted by (term, block): ``term`` [P] int64, global ``blocks`` [P], ``tf`` [P]."""
        terms, starts = np.unique(term, return_index=True)
        offsets = np.append(starts, term.shape[0]).astype(np.int64)
        tdt = uint_dtype(int(terms[-1]) if terms.shape[0] else 0)
        bdt = uint_dtype(max(end - first - 1, 0))
        return cls(first, end, terms.astype(tdt), offsets, (blocks - first).astype(bdt), tf.astype(np.uint8), first)

    @classmethod
    def build(cls, first: int, ids: np.ndarray) -> Segment:
        """Postings of blocks ``ids`` [n, 32] (token ids >= 0) numbered from ``first``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, BLOCK)
        n = ids.shape[0]
        local = np.repeat(np.arange(n, dtype=np.int64), BLOCK)
        keys = ids.reshape(-1) * max(n, 1) + local  # (term, block) packed; sorting keys sorts by term then block
        uniq, counts = np.unique(keys, return_counts=True)
        term, blk = np.divmod(uniq, max(n, 1))
        return cls.from_sorted(first, first + n, term, blk + first, counts)

    def expanded_terms(self) -> np.ndarray:
        """The term of every posting [P] (int64)."""
        return np.repeat(self.terms.astype(np.int64), np.diff(self.offsets))

    def global_blocks(self, idx=slice(None)) -> np.ndarray:
        """Block ids (int64) of postings ``idx``."""
        return self.blocks[idx].astype(np.int64) + self.base

    def lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For query terms ``q`` [Q] int64 >= 0: (found [Q] bool, posting start [Q], posting end [Q]) (empty where
        absent). ``q`` is cast to the terms' dtype (ids it cannot hold are absent), so a memory-mapped ``terms``
        is searched in place, not converted."""
        fits = q <= np.iinfo(self.terms.dtype).max
        qc = np.where(fits, q, 0).astype(self.terms.dtype)
        pos = np.searchsorted(self.terms, qc)
        found = fits & (pos < self.terms.shape[0])
        found[found] = self.terms[pos[found]] == qc[found]
        pos = np.where(found, pos, 0)
        start = np.where(found, self.offsets[pos], 0)
        end = np.where(found, self.offsets[np.minimum(pos + 1, self.offsets.shape[0] - 1)], 0)
        return found, start, end


def merge_segments(segs: list[Segment]) -> Segment:
    """One segment for adjacent segments (in block order), in RAM; postings stay sorted by term, then block.
    (Segments on disk are merged by streaming instead: :func:`megacontext.tree.lexical_file.write_merged`.)"""
    if len(segs) == 1:
        return segs[0]
    for a, b in zip(segs, segs[1:], strict=False):
        if a.end != b.first:
            raise ValueError(f"segments [{a.first}, {a.end}) and [{b.first}, {b.end}) are not adjacent")
    term = np.concatenate([s.expanded_terms() for s in segs])
    order = np.argsort(term, kind="stable")  # stable: block order (segment order) kept within a term
    blocks = np.concatenate([s.global_blocks() for s in segs])[order]
    tf = np.concatenate([s.tf for s in segs])[order]
    return Segment.from_sorted(segs[0].first, segs[-1].end, term[order], blocks, tf)


def gather_ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(start[i], end[i])`` for all i, and the range number of each element (no loop)."""
    lengths = end - start
    total = int(lengths.sum())
    owner = np.repeat(np.arange(lengths.shape[0]), lengths)
    first_out = np.cumsum(lengths) - lengths
    return start[owner] + np.arange(total) - first_out[owner], owner


class LexicalIndex:
    """In-RAM inverted index of a history's complete blocks (see module docstring)."""

    def __init__(self, cfg: BM25Config | None = None, segments: list[Segment] | None = None):
        self.cfg = cfg or BM25Config()
        self.segments: list[Segment] = list(segments or [])

    @property
    def num_blocks(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @property
    def num_postings(self) -> int:
        return sum(s.num_postings for s in self.segments)

    def add(self, first_block: int, ids) -> None:
        """Index blocks ``ids`` [n, 32] starting at ``first_block`` (must equal ``num_blocks``)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, BLOCK)
        if first_block != self.num_blocks:
            raise ValueError(f"blocks must be added in order: the index ends at block {self.num_blocks}, "
                             f"got blocks from {first_block}")
        if ids.shape[0] == 0:
            return
        if (ids < 0).any():
            raise ValueError("token ids must be >= 0")
        self.segments.append(Segment.build(first_block, ids))
        self._compact()

    def truncate(self, num_blocks: int) -> None:
        """Keep only blocks ``[0, num_blocks)`` (a store that lost uncommitted blocks)."""
        keep = [s for s in self.segments if s.end <= num_blocks]
        cut = [s for s in self.segments if s.first < num_blocks < s.end]
        for s in cut:  # rare: rebuild the straddling segment's prefix from its postings
            g = s.global_blocks()
            m = g < num_blocks
            keep.append(Segment.from_sorted(s.first, num_blocks, s.expanded_terms()[m], g[m], s.tf[m]))
        self.segments = sorted(keep, key=lambda s: s.first)

    def _compact(self) -> None:
        """Merge the newest segments while the older one is less than ``fanout`` times the newer one: sizes then
        grow at least ``fanout``-fold from newest to oldest, so there are at most ``log_fanout(n) + 1``."""
        f, segs = self.cfg.fanout, self.segments
        while len(segs) >= 2 and self._mergeable(segs[-2]) and segs[-2].num_blocks < f * segs[-1].num_blocks:
            segs[-2:] = [merge_segments(segs[-2:])]

    def _mergeable(self, seg: Segment) -> bool:
        """Whether ``_compact`` may merge ``seg`` in RAM (a stored index merges its on-disk segments on disk)."""
        return True

    # ------------------------------------------------------------------ queries
    def postings(self, q: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query-term number [M], block [M], tf [M]) of every posting of terms ``q`` [Q] in blocks < limit,
        skipping terms over the ``max_df`` cutoff (decided from posting-range lengths, before any is read)."""
        segs = [s for s in self.segments if s.first < limit]
        if not segs or q.shape[0] == 0 or limit <= 0:
            z = np.zeros(0, np.int64)
            return z, z, z
        ranges = []
        for seg in segs:
            _, s, e = seg.lookup(q)
            if seg.end > limit:  # the segment holding the limit: cut each term's range (a loop over Q terms)
                e = e.copy()
                for i in np.flatnonzero(e > s):
                    e[i] = s[i] + np.searchsorted(seg.blocks[s[i]:e[i]], limit - seg.base)
            ranges.append((s, e))
        df = sum(e - s for s, e in ranges)  # [Q] document frequency within [0, limit)
        keep = df <= self.cfg.max_postings
        if limit >= self.cfg.min_blocks_for_cutoff and self.cfg.max_df < 1:
            keep &= df <= self.cfg.max_df * limit
        qn, bl, tf = [], [], []
        for seg, (s, e) in zip(segs, ranges, strict=True):
            idx, owner = gather_ranges(s[keep], e[keep])
            qn.append(np.flatnonzero(keep)[owner])
            bl.append(seg.global_blocks(idx))
            tf.append(seg.tf[idx].astype(np.int64))
        return np.concatenate(qn), np.concatenate(bl), np.concatenate(tf)

    def scores(self, query_ids, limit_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """BM25 of every block sharing a term with ``query_ids`` (any int sequence; -1 = padding, ignored).
        Returns (blocks [M] int64 ascending, scores [M] float32 > 0); cost O(matches)."""
        limit = self.num_blocks if limit_block is None else min(int(limit_block), self.num_blocks)
        q = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        q, qtf = np.unique(q[q >= 0], return_counts=True)
        qn, bl, tf = self.postings(q, limit)
        if bl.shape[0] == 0 or limit <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        cfg = self.cfg
        df = np.bincount(qn, minlength=q.shape[0]).astype(np.float64)  # [Q] within the limit
        idf = np.log1p((limit - df + 0.5) / (df + 0.5))
        qw = qtf * (cfg.k3 + 1) / (qtf + cfg.k3)
        contrib = qw[qn] * idf[qn] * tf * (cfg.k1 + 1) / (tf + cfg.k1)  # [M]
        blocks, inv = np.unique(bl, return_inverse=True)
        return blocks, np.bincount(inv, weights=contrib).astype(np.float32)


def entry_block_ranges(levels: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First block and end block [E] of every entry (LOD0: its block; LOD``l``: ``32^(l-1)`` blocks)."""
    levels, indices = np.asarray(levels, np.int64), np.asarray(indices, np.int64)
    per = np.where(levels <= 1, 1, BLOCK ** np.maximum(levels - 1, 0))
    return indices * per, (indices + 1) * per


def entry_scores(blocks: np.ndarray, scores: np.ndarray, levels, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate sparse block scores (``blocks`` ascending) over entries in time order (a tiling) ->
    (max [E], sum [E], best block [E], -1 where no block of the span matched)."""
    lo_b, hi_b = entry_block_ranges(levels, indices)
    e = lo_b.shape[0]
    mx, sm, best = np.zeros(e, np.float32), np.zeros(e, np.float32), np.full(e, -1, np.int64)
    if e == 0 or blocks.shape[0] == 0:
        return mx, sm, best
    lo, hi = np.searchsorted(blocks, lo_b), np.searchsorted(blocks, hi_b)
    csum = np.concatenate([[0.0], np.cumsum(scores, dtype=np.float64)])
    sm[:] = csum[hi] - csum[lo]
    hit = hi > lo
    if hit.any():
        # entries tile time in order, so the non-empty ranges are consecutive: one reduceat covers them all
        base = lo[hit][0]
        starts = lo[hit] - base
        seg = scores[base: hi[hit][-1]]
        mx[hit] = np.maximum.reduceat(seg, starts)
        # best block: the first position in each range holding its max
        owner = np.repeat(np.arange(starts.shape[0]), np.diff(np.append(starts, seg.shape[0])))
        pos = np.flatnonzero(seg == mx[hit][owner])
        first = np.unique(owner[pos], return_index=True)[1]
        best[hit] = blocks[base + pos[first]]
    return mx, sm, best
