"""LensNet's query-conditioned lexical feature: how well each working-context entry's text matches the query.

Per entry, from the history's lexical index (:mod:`megacontext.tree.lexical`: BM25 over 32-token blocks,
query = LensNet's tail, i.e. the most recent tokens or the prompt; only blocks that end before the query
are searched, see :func:`megacontext.tree.lexical_source.search_limit`), three numbers:
- ``log1p(max)``: the best BM25 score of a block under the entry's span (an LOD2 gist: its best child);
- ``log1p(sum)``: the total over the span (many weak matches vs one strong one);
- ``max / max over the context``: the same best score relative to this context's best entry, so the
  network sees "the strongest match here" independently of how rare the query's words are.
Entries with no matching block get zeros. The best block of each entry (``-1`` where none) comes back too:
it is the target of a multi-level move (:mod:`megacontext.wc.allocator`).

Cost: one BM25 query (O(matches), see the index) and an O(E log M) aggregation per scored context.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megacontext.tree.lexical import LexicalIndex, entry_scores
from megacontext.tree.lexical_source import SourceIndex, search_limit

LEX_FEATURES = 3  # width of the feature vector (see module docstring)


def lexical_features(index: LexicalIndex, limit: int, query_ids, levels: Tensor, indices: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """(features [E, 3] float32, best block [E] int64) for entries ``(levels, indices)`` of one tiling."""
    q = np.asarray(query_ids.cpu() if isinstance(query_ids, Tensor) else query_ids, np.int64).reshape(-1)
    blocks, sc = index.scores(q, limit_block=limit)
    lv, ix = levels.cpu().numpy(), indices.cpu().numpy()
    mx, sm, best = entry_scores(blocks, sc, lv, ix)
    top = float(mx.max()) if mx.size else 0.0
    feat = np.stack([np.log1p(mx), np.log1p(sm), mx / max(top, 1e-6)], axis=-1).astype(np.float32)  # [E, 3]
    return torch.from_numpy(feat).reshape(-1, LEX_FEATURES), torch.from_numpy(best)


def source_features(cache: SourceIndex, source, num_tokens: int, query: Tensor, levels: Tensor, indices: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """:func:`lexical_features` for a history source read through ``cache``; ``query`` [Q] (may hold -1
    padding) are the last tokens read, so only blocks ending before them are searched."""
    index, n_blocks = cache.get(source)
    q_len = int((query >= 0).sum())
    limit = min(search_limit(num_tokens, q_len), n_blocks)
    return lexical_features(index, limit, query, levels, indices)
