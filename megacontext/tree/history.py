"""The read API of a history (:class:`HistorySource`, the one such protocol) and an in-memory implementation.

Everything above the tree reads a history through this protocol: materialisation of the working context
(``tokens`` and ``gather_gists``), focus policies, the engine. :class:`megacontext.tree.store.MegaContextTree`
(on disk), :class:`InMemoryHistory` (RAM, for training and tests) and
:class:`megacontext.tree.window.HistoryWindow` (a suffix of either) implement it; lighter views used in
label generation and benchmarks implement the part their readers use. Invariants shared by every
implementation:

- ``num_entries(0) == num_entries(1) == num_tokens // 32`` and ``num_entries(l) == num_tokens // 32 ** l``
  for every gist level ``l`` (LOD2: per 1,024 tokens, LOD3: per 32,768, ...); the ``num_tokens % 32`` tokens
  after the last complete block form the tail (``tail_tokens()``), which has no gist yet.
- ``tokens`` returns int64 ids; ``gists`` (a range) and ``gather_gists`` (any index set, unsorted and
  repeated allowed) return ``[n, d]`` in the history's gist dtype on CPU. A gather reads only the rows
  asked for, so its cost does not depend on how far apart they lie.
- Gists of level ``l >= 2`` are computed from the 32 LOD``l-1`` gists *as stored* (after rounding to the
  gist dtype), so a history rebuilt from its tokens reproduces its gists bit for bit whatever the batching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, MAX_LEVEL, complete_entries
from megacontext.tree.compressor import Compressor, gists_of_blocks, gists_of_groups
from megacontext.tree.format import DTYPES, GIST_DTYPES

_INT32_IDS = 2**31  # LOD0 stores int32 ids


def check_range(what: str, start: int, end: int, limit: int) -> None:
    if not 0 <= start <= end <= limit:
        raise IndexError(f"{what} range [{start}, {end}) is outside [0, {limit})")


def check_level(level: int) -> None:
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level={level} is out of range; expected 0..{MAX_LEVEL}")


def check_gist_level(level: int) -> None:
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level={level}; gists exist at levels 1..{MAX_LEVEL}")


def check_indices(what: str, indices: Tensor, limit: int) -> Tensor:
    """Validate a 1-D integer index tensor against ``[0, limit)``; returns it as int64 on CPU."""
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
            or indices.dtype == torch.bool:
        got = f"{tuple(indices.shape)} {indices.dtype}" if isinstance(indices, Tensor) else type(indices).__name__
        raise TypeError(f"{what} indices must be a 1-D integer tensor, got {got}")
    idx = indices.detach().to("cpu", torch.long)
    if idx.numel():
        lo, hi = idx.aminmax()  # one pass, one sync, whatever the index count
        if lo < 0 or hi >= limit:
            bad = int(lo) if lo < 0 else int(hi)
            raise IndexError(f"{what} index {bad} is outside [0, {limit})")
    return idx


def as_token_array(ids, vocab_size: int | None = None) -> np.ndarray:
    """Token ids (tensor, array or list) -> int32 [n], refusing non-integers (TypeError) and ids outside
    ``[0, vocab_size)`` (ValueError naming the id; without a vocabulary, the int32 range)."""
    if isinstance(ids, Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a {ids.dtype} tensor")
        arr = ids.detach().cpu().numpy()
    else:
        arr = np.asarray(ids)
    arr = arr.reshape(-1)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        limit = vocab_size or _INT32_IDS
        if lo < 0 or hi >= limit:
            where = f"the vocabulary of {vocab_size}" if vocab_size else f"[0, {_INT32_IDS - 1}]"
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside {where} (ids must lie in [0, {limit}))")
    return arr.astype(np.int32)


def gather_by_runs(read_range: Callable[[int, int], Tensor], indices: Tensor) -> Tensor:
    """Emulate a gather over a source that only reads ranges: one ``read_range(start, end)`` per run of
    consecutive distinct indices, so the rows read are the rows asked for (never the span between them).

    indices: int64 [n] on CPU, any order, repeats allowed -> ``read_range`` rows [n, ...] in that order."""
    uniq, inverse = torch.unique(indices, sorted=True, return_inverse=True)  # [u], [n]
    if uniq.numel() == 0:
        return read_range(0, 0)
    breaks = (uniq[1:] != uniq[:-1] + 1).nonzero().flatten() + 1
    starts = torch.cat([breaks.new_zeros(1), breaks])
    ends = torch.cat([breaks, breaks.new_tensor([uniq.numel()])])
    bounds = torch.stack([uniq[starts], uniq[ends - 1] + 1], 1).tolist()  # one sync for all runs
    rows = torch.cat([read_range(s, e) for s, e in bounds])  # [u, ...]: reads only what is needed
    return rows[inverse]


def gist_torch_dtype(name: str) -> torch.dtype:
    if name not in GIST_DTYPES:
        raise ValueError(f"gist_dtype={name!r}; expected one of {GIST_DTYPES}")
    return DTYPES[name][2]


@runtime_checkable
class HistorySource(Protocol):
    fingerprint: str
    d_model: int
    compressor_version: str

    @property
    def num_tokens(self) -> int: ...

    def tokens(self, start: int, end: int) -> Tensor:
        """Token ids of span [start, end) -> int64 [end - start]."""
        ...

    def gists(self, level: int, start_index: int, end_index: int) -> Tensor:
        """Gists (level >= 1) with indices [start_index, end_index) -> [n, d]."""
        ...

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        """Gists (level >= 1) at ``indices`` [n] (any order, repeats allowed) -> [n, d]."""
        ...

    def num_entries(self, level: int) -> int: ...

    def tail_tokens(self) -> Tensor: ...


class InMemoryHistory:
    """A whole token history with its gists precomputed in RAM (batched compressor calls, no grad), every level
    the history reaches (LOD1, LOD2, and LOD3+ once it is long enough)."""

    def __init__(self, tokens: Tensor, compressor: Compressor, fingerprint: str = "",
                 gist_dtype: str = "float16", batch_blocks: int = 4096):
        tokens = torch.as_tensor(tokens).reshape(-1).long().cpu()
        if batch_blocks <= 0:
            raise ValueError(f"batch_blocks={batch_blocks}; expected a positive int")
        self._tokens = tokens
        self.fingerprint = fingerprint
        self.d_model = int(compressor.d_model)
        self.compressor_version = compressor.version
        self.gist_dtype = gist_dtype
        dt = gist_torch_dtype(gist_dtype)
        n1 = complete_entries(tokens.numel(), 1)
        blocks = tokens[: n1 * BLOCK].view(n1, BLOCK)  # [n1, 32]
        lod1 = [gists_of_blocks(compressor, blocks[i:i + batch_blocks]).to(dt) for i in range(0, n1, batch_blocks)]
        self._levels = {1: torch.cat(lod1) if lod1 else torch.empty(0, self.d_model, dtype=dt)}  # level -> [n, d]
        step = max(batch_blocks // BLOCK, 1) * BLOCK
        level = 2
        while level <= MAX_LEVEL and (n := complete_entries(tokens.numel(), level)):
            below = self._levels[level - 1]
            parts = [gists_of_groups(compressor, below[i:min(i + step, n * BLOCK)], level).to(dt)
                     for i in range(0, n * BLOCK, step)]
            self._levels[level] = torch.cat(parts)  # [n, d]
            level += 1

    @property
    def num_tokens(self) -> int:
        return self._tokens.numel()

    def num_entries(self, level: int) -> int:
        check_level(level)
        return complete_entries(self.num_tokens, level)

    def tokens(self, start: int, end: int) -> Tensor:
        check_range("token", start, end, self.num_tokens)
        return self._tokens[start:end].clone()

    def _table(self, level: int) -> Tensor:
        check_gist_level(level)
        return self._levels.get(level, self._levels[1][:0])

    def gists(self, level: int, start_index: int, end_index: int) -> Tensor:
        store = self._table(level)
        check_range(f"LOD{level} gist", start_index, end_index, store.shape[0])
        return store[start_index:end_index].clone()

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        store = self._table(level)
        return store[check_indices(f"LOD{level} gist", indices, store.shape[0])]  # [n, d], a copy

    def tail_tokens(self) -> Tensor:
        return self._tokens[self.num_entries(1) * BLOCK:].clone()
