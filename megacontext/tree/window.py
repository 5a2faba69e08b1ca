"""Views of a history: :class:`HistoryWindow` (a suffix seen as a history of its own) and
:class:`GatherView` (``gather_gists`` for a history that only reads ranges).

HistoryWindow: the suffix of a history from an LOD2-aligned token offset, seen as a history of its own.

Why it exists: a working context tiles its history gap-free from token 0, so its cost is at least one
slot per 1,024 tokens (LOD2 is the coarsest level). With ``w_max`` slots it can therefore cover at most
about ``(w_max - recent_raw - 60) * 1024`` tokens (:func:`megacontext.wc.tiling.reach`); e.g. ~1.9M
tokens at ``w_max=2048``.
A longer tree (100M tokens) is still stored whole on disk, but the engine must be attached to a window of
its most recent part. The window re-bases token and gist indices, so the working context, the engine
and the focus policies run unchanged on it, and appends go through to the underlying store.

Invariants
- ``start`` is a multiple of 1,024 (one LOD2 span), so every LOD1/LOD2 gist of the window is exactly a
  gist of the underlying history (``level-l index i`` of the window is index ``i + start / span(l)``).
- The window only grows at the end (appends) and never moves; re-anchoring to a later ``start`` means a
  new window and a new working context.
"""

from __future__ import annotations

from torch import Tensor

from megacontext.core.lod import BLOCK, MAX_LEVEL, complete_entries, span
from megacontext.tree.history import (
    HistorySource,
    check_gist_level,
    check_indices,
    check_level,
    check_range,
    gather_by_runs,
)


def window_start(num_tokens: int, length: int) -> int:
    """The LOD2-aligned start of a window holding at least the last ``min(length, num_tokens)`` tokens."""
    if length < 0:
        raise ValueError(f"length={length} must be >= 0")
    return max(num_tokens - length, 0) // span(MAX_LEVEL) * span(MAX_LEVEL)


class HistoryWindow:
    """History ``[start, num_tokens)`` of ``source`` (a HistorySource, optionally with ``append``)."""

    def __init__(self, source, start: int):
        if start < 0 or start % span(MAX_LEVEL):
            raise ValueError(f"start={start} must be a non-negative multiple of {span(MAX_LEVEL)} (one LOD2 span)")
        if start > source.num_tokens:
            raise ValueError(f"start={start} is past the end of the history ({source.num_tokens} tokens)")
        self.source, self.start = source, start
        self.fingerprint = source.fingerprint
        self.d_model = source.d_model
        self.compressor_version = source.compressor_version

    @property
    def num_tokens(self) -> int:
        return self.source.num_tokens - self.start

    def num_entries(self, level: int) -> int:
        check_level(level)
        return complete_entries(self.num_tokens, level)

    def tokens(self, start: int, end: int) -> Tensor:
        check_range("token", start, end, self.num_tokens)
        return self.source.tokens(self.start + start, self.start + end)

    def gists(self, level: int, start_index: int, end_index: int) -> Tensor:
        if level not in (1, 2):
            raise ValueError(f"level={level}; gists exist at levels 1 and 2")
        check_range(f"LOD{level} gist", start_index, end_index, self.num_entries(level))
        off = self.start // span(level)
        return self.source.gists(level, start_index + off, end_index + off)

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        """Gists at window-relative ``indices`` [n] -> [n, d] (one gather on the source, as materialise wants)."""
        check_gist_level(level)
        idx = check_indices(f"LOD{level} gist", indices, self.num_entries(level))
        return self.source.gather_gists(level, idx + self.start // span(level))

    def tail_tokens(self) -> Tensor:
        return self.source.tail_tokens()  # start is block-aligned, so the tail is the source's tail

    def append(self, token_ids) -> None:
        self.source.append(token_ids)

    def __repr__(self) -> str:
        return f"HistoryWindow(start={self.start}, tokens={self.num_tokens}, blocks={self.num_tokens // BLOCK})"


class GatherView:
    """Gives the WC's ``gather_gists(level, indices)`` to any history: the source's own gather when it has
    one (the tree and ``InMemoryHistory`` do), else one ``gists(level, start, end)`` read per run of
    consecutive indices, so a refocus never reads the gists lying between far-apart entries."""

    def __init__(self, source):
        self.source = source

    @property
    def num_tokens(self) -> int:
        return self.source.num_tokens

    def tokens(self, start: int, end: int) -> Tensor:
        return self.source.tokens(start, end)

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        if hasattr(self.source, "gather_gists"):
            return self.source.gather_gists(level, indices)
        return gather_by_runs(lambda s, e: self.source.gists(level, s, e), indices.cpu().long())  # [n, d]


def gathering(source) -> HistorySource:
    """``source`` itself when it gathers (the tree, ``InMemoryHistory``, a window), else a :class:`GatherView`."""
    return source if hasattr(source, "gather_gists") else GatherView(source)
