"""The lexical index of any history source, and the query window a causal reader may search.

A store (:class:`~megacontext.tree.store.MegaContextTree`) keeps its own index (``tree.lexical``); other
sources (an :class:`~megacontext.tree.history.InMemoryHistory`, a benchmark prefix of one, a LensNet
``DocSource`` over a document) get one from a :class:`SourceIndex`, built incrementally from their tokens
and reused across calls while the underlying history object stays the same. Prefix views of one history
(``source.full`` / ``source.view``) share its index: it grows to the longest prefix seen, and every query is
limited to the blocks of the prefix asked about, so a reader at token ``t`` never sees a block past ``t``.

:func:`search_limit`: the query (the most recent tokens, or a prompt just appended) must not match itself,
so only complete blocks that end before the query's first token are searched.
"""

from __future__ import annotations

import numpy as np

from megacontext.core.lod import BLOCK
from megacontext.tree.lexical import BM25Config, LexicalIndex


def search_limit(num_tokens: int, query_len: int) -> int:
    """Blocks a query of the last ``query_len`` tokens of a ``num_tokens`` history may match: ``[0, limit)``."""
    return max(num_tokens - query_len, 0) // BLOCK


class SourceIndex:
    """Per-policy cache: ``get(source) -> (index, complete blocks of source)`` (see module docstring)."""

    def __init__(self, cfg: BM25Config | None = None):
        self.cfg = cfg or BM25Config()
        self._owner: object | None = None  # the history object the cached index belongs to (kept alive)
        self._index = LexicalIndex(self.cfg)

    def get(self, source) -> tuple[LexicalIndex, int]:
        n = int(source.num_tokens) // BLOCK
        own = getattr(source, "lexical", None)
        if own is not None:  # a store: its persistent index, caught up with pending blocks
            own.sync(source)
            return own, n
        owner = next((o for o in (getattr(source, "full", None), getattr(source, "view", None)) if o is not None),
                     source)
        if owner is not self._owner:
            self._owner, self._index = owner, LexicalIndex(self.cfg)
        have = self._index.num_blocks
        if n > have:
            ids = source.tokens(have * BLOCK, n * BLOCK)
            self._index.add(have, np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, np.int64).reshape(-1, BLOCK))
        return self._index, n
