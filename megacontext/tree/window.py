"""Views of a history: :class:`HistoryWindow` (a suffix seen as a history of its own) and
:class:`GatherView` (``gather_gists`` for a history that only reads ranges).

HistoryWindow: the suffix of a history from an aligned token offset, seen as a history of its own.

Why it exists: before levels above LOD2 existed, a working context (one slot per 1,024 tokens at best)
could not tile a history past ``(w_max - recent_raw - 60) * 1024`` tokens, so long trees were read through a
window of their most recent part. With unbounded depth the whole history fits any practical budget
(:func:`megacontext.wc.tiling.reach`); windows remain for experiments that want to read only a recent part.
The window re-bases token and gist indices, so the working context, the engine and the focus policies run
unchanged on it, and appends go through to the underlying store.

Invariants
- ``start`` is a multiple of 1,024 (one LOD2 span), so every LOD1/LOD2 gist of the window is exactly a
  gist of the underlying history (``level-l index i`` of the window is index ``i + start / span(l)``).
  A coarser level ``l`` is served only when ``start`` is a multiple of ``span(l)`` too (always for
  ``start = 0``); otherwise reading it raises, since the window's LOD``l`` spans are no gists of the tree.
- The window only grows at the end (appends) and never moves; re-anchoring to a later ``start`` means a
  new window and a new working context.
"""

from __future__ import annotations

from torch import Tensor

from megacontext.core.lod import BLOCK, complete_entries, span
from megacontext.tree.history import (
    HistorySource,
    check_gist_level,
    check_indices,
    check_level,
    check_range,
    gather_by_runs,
)

_ALIGN = span(2)  # window starts are multiples of one LOD2 span


def window_start(num_tokens: int, length: int) -> int:
    """The LOD2-aligned start of a window holding at least the last ``min(length, num_tokens)`` tokens."""
    if length < 0:
        raise ValueError(f"length={length} must be >= 0")
    return max(num_tokens - length, 0) // _ALIGN * _ALIGN


class HistoryWindow:
    """History ``[start, num_tokens)`` of ``source`` (a HistorySource, optionally with ``append``)."""

    def __init__(self, source, start: int):
        if start < 0 or start % _ALIGN:
            raise ValueError(f"start={start} must be a non-negative multiple of {_ALIGN} (one LOD2 span)")
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

    def _check_aligned(self, level: int) -> None:
        check_gist_level(level)
        if self.start % span(level):
            raise ValueError(f"a window starting at token {self.start} has no LOD{level} gists (its start is not a "
                             f"multiple of {span(level)}); read LOD{level} through the whole history")

    def gists(self, level: int, start_index: int, end_index: int) -> Tensor:
        self._check_aligned(level)
        check_range(f"LOD{level} gist", start_index, end_index, self.num_entries(level))
        off = self.start // span(level)
        return self.source.gists(level, start_index + off, end_index + off)

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        """Gists at window-relative ``indices`` [n] -> [n, d] (one gather on the source, as materialise wants)."""
        self._check_aligned(level)
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
