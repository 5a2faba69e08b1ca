"""Lexical focus: a query-aware, training-free policy on the history's lexical index (BM25 over blocks).

The *query* is the most recent ``query_tokens`` tokens (during generation: the prompt). Every complete
block that ends before the query is scored by BM25 against it (:mod:`megacontext.tree.lexical`: the
store's own persistent index, or one this policy builds incrementally for other sources), and the scores
are aggregated over each working-context entry's span (:func:`~megacontext.tree.lexical.entry_scores`:
max, and the best block). An entry *matches* when its best block scores at least ``min_score`` and at
least ``relative`` times the best entry's; matching gists get positive scores ``match_scale * max / best``
(the strongest match gets ``match_scale``), and their best block becomes the target of a multi-level move
(``last_targets``), so a strong match at LOD2 comes down to raw in one step. Unmatched unprotected raw
blocks get small negative scores that grow with age, so the allocator pays for expansions with the oldest
unmatched detail but never collapses voluntarily (scores stay above ``-tau_collapse`` for the default
allocator config). By default it acts only on prompts (phase ``generate``): while ordinary text streams
in, overlaps with the last few sentences are mostly chance, and chasing them churns the tiling.

Cost: one BM25 query, O(matches) (terms in more than ``max_df`` of the blocks are skipped before their
postings are read), plus an O(E log M) aggregation; nothing scans the history. This replaces the earlier
n-gram scan over the whole token history (O(history) per refocus).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from megacontext.core.config import Config, check
from megacontext.focus.policy import FocusState, idle_scores
from megacontext.tree.lexical import BM25Config, entry_scores
from megacontext.tree.lexical_source import SourceIndex, search_limit


@dataclass
class LexicalFocusConfig(Config):
    query_tokens: int = 64  # most recent tokens forming the query when no prompt is given
    min_score: float = 4.0  # BM25 of an entry's best block needed to count as a match (~ one rare shared token)
    relative: float = 0.5  # ... and at least this fraction of the best entry's (focus on the strongest matches)
    match_scale: float = 2.0  # score of the strongest match (above AllocatorConfig.tau_deep: it goes to raw)
    idle_collapse: float = 0.05  # magnitude of the (negative) score of the oldest unmatched raw block
    streaming: bool = False  # also act while plain text streams in (ingest/score), not only on prompts
    bm25: BM25Config = field(default_factory=BM25Config)

    def __post_init__(self):
        check(self.query_tokens >= 1, f"query_tokens={self.query_tokens} must be >= 1")
        check(self.min_score >= 0, f"min_score={self.min_score} must be >= 0")
        check(0 <= self.relative <= 1, f"relative={self.relative} must lie in [0, 1]")
        check(self.match_scale > 0, f"match_scale={self.match_scale} must be > 0")
        check(self.idle_collapse >= 0, f"idle_collapse={self.idle_collapse} must be >= 0")


class LexicalFocus:
    """Query-aware, training-free focus by BM25 match with the query (see module docstring)."""

    name = "lexical"

    def __init__(self, cfg: LexicalFocusConfig | None = None):
        self.cfg = cfg or LexicalFocusConfig()
        self._index = SourceIndex(self.cfg.bm25)
        self.last_targets: Tensor | None = None  # best block per entry of the last scores() (-1 = none)

    @property
    def query_tokens(self) -> int:
        return self.cfg.query_tokens

    def entry_matches(self, wc, state: FocusState) -> tuple[Tensor, Tensor]:
        """(best BM25 score under each entry [E], best block [E], -1 where none) against ``state.query``."""
        index, n_blocks = self._index.get(state.source)
        query = state.query.long().cpu()[-self.cfg.query_tokens:]
        limit = min(search_limit(state.num_tokens, query.numel()), n_blocks)  # the query never matches itself
        blocks, sc = index.scores(query.numpy(), limit_block=limit)
        mx, _, best = entry_scores(blocks, sc, wc.levels.cpu().numpy(), wc.indices.cpu().numpy())
        return torch.from_numpy(mx), torch.from_numpy(best)

    def scores(self, wc, state: FocusState) -> Tensor | None:
        cfg = self.cfg
        self.last_targets = None
        if not cfg.streaming and state.phase != "generate":
            return None
        mx, best = self.entry_matches(wc, state)
        top = mx.max().clamp(min=1e-6) if mx.numel() else torch.tensor(1.0)
        matched = (mx >= cfg.min_score) & (mx >= cfg.relative * top)
        levels = wc.levels.cpu()
        _, ends = wc.spans()
        idle = idle_scores(ends.cpu(), state.num_tokens, cfg.idle_collapse)  # older unmatched raw blocks pay first
        out = torch.where(matched & (levels > 0), cfg.match_scale * mx / top, torch.zeros_like(idle))
        out = torch.where(~matched & (levels == 0), idle, out)
        self.last_targets = torch.where(matched, best, torch.full_like(best, -1)).to(wc.levels.device)
        return out.to(wc.levels.device)
