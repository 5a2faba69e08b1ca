"""Lexical focus: a query-aware, training-free policy. The *query* is the most recent ``query_tokens``
  tokens (during generation: the prompt). Every n-gram of the query that also occurs
  earlier in the history marks the entries covering those occurrences; an entry's score is the sum of
  ``1 / occurrences`` of its matching n-grams (rare n-grams weigh most; n-grams seen more than
  ``max_occurrences`` times are ignored as boilerplate, and entries scoring below ``min_score`` count as
  unmatched, so chance overlaps in ordinary text do not make the focus thrash). Matching gists get
  positive scores (expand); unmatched unprotected raw blocks get small negative scores that grow with
  age, so the allocator pays for expansions with the oldest unmatched detail but never collapses
  voluntarily (scores stay above ``-tau_collapse`` for the default allocator config). By default it acts
  only on prompts (phase ``generate``): while ordinary text streams in, overlaps with the last few
  sentences are mostly chance, and chasing them churns the tiling (measured on the demo log).

Design choices
- n-gram ids are polynomial hashes of token ids (int64 arithmetic wraps, which is harmless for
  equality tests); ``torch.isin``/``torch.unique`` keep it vectorised, and per-entry sums use a cumulative
  sum indexed by entry bounds, so a refocus costs O(history) tensor work and no Python loop over entries.
- The token history is cached in the policy and extended incrementally, so the tree is read once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.core.config import Config, check
from megacontext.focus.policy import FocusState, idle_scores, span_sums


@dataclass
class LexicalFocusConfig(Config):
    ngram: int = 4  # tokens per matched n-gram
    query_tokens: int = 64  # most recent tokens forming the query when no prompt is given
    max_occurrences: int = 2  # n-grams seen more often in the history are boilerplate and ignored
    min_score: float = 1.5  # an entry needs about this many rare matches to ask for detail (filters chance hits)
    match_scale: float = 1.0  # score per fully weighted match
    idle_collapse: float = 0.05  # magnitude of the (negative) score of the oldest unmatched raw block
    streaming: bool = False  # also act while plain text streams in (ingest/score), not only on prompts

    def __post_init__(self):
        check(self.ngram >= 1, f"ngram={self.ngram} must be >= 1")
        check(self.query_tokens >= self.ngram, f"query_tokens={self.query_tokens} must be >= ngram={self.ngram}")
        check(self.max_occurrences >= 1, f"max_occurrences={self.max_occurrences} must be >= 1")
        check(self.match_scale > 0, f"match_scale={self.match_scale} must be > 0")
        check(self.min_score >= 0, f"min_score={self.min_score} must be >= 0")
        check(self.idle_collapse >= 0, f"idle_collapse={self.idle_collapse} must be >= 0")


_HASH_MUL = 1_000_003


def ngram_ids(tokens: Tensor, n: int) -> Tensor:
    """int64 [T] -> [T - n + 1] hash ids of every n-gram (wrapping int64 polynomial hash)."""
    t = tokens.long()
    if t.numel() < n:
        return t.new_empty(0)
    h = t[: t.numel() - n + 1].clone()
    for j in range(1, n):  # n is a small constant (the n-gram length), not a data-dependent loop
        h = h * _HASH_MUL + t[j: t.numel() - n + 1 + j]
    return h


def match_weights(history: Tensor, query: Tensor, n: int, max_occurrences: int) -> Tensor:
    """float [T] weight per history token: sum over the query n-grams that cover it of 1/occurrences.

    ``history`` is searched as given (callers pass the part before the query)."""
    hist_ids, q_ids = ngram_ids(history, n), ngram_ids(query, n).unique()
    weights = torch.zeros(history.numel(), dtype=torch.float32)
    if hist_ids.numel() == 0 or q_ids.numel() == 0:
        return weights
    hit = torch.isin(hist_ids, q_ids)  # [T - n + 1]
    uniq, inverse, counts = hist_ids.unique(return_inverse=True, return_counts=True)
    occ = counts[inverse].float()  # occurrences of each position's n-gram
    w = torch.where(hit & (occ <= max_occurrences), 1.0 / occ, torch.zeros_like(occ))  # [T - n + 1]
    # spread each n-gram's weight over its n tokens (a match covers all of them)
    for j in range(n):
        weights[j: j + w.numel()] += w / n
    return weights


class LexicalFocus:
    """Query-aware, training-free focus by rare n-gram overlap with the query (see module docstring)."""

    name = "lexical"

    def __init__(self, cfg: LexicalFocusConfig | None = None):
        self.cfg = cfg or LexicalFocusConfig()
        self._tokens = torch.empty(0, dtype=torch.long)

    @property
    def query_tokens(self) -> int:
        return self.cfg.query_tokens

    def _history(self, source, num_tokens: int) -> Tensor:
        have = self._tokens.numel()
        if num_tokens < have:  # a different (shorter) history: start over
            self._tokens, have = self._tokens[:0], 0
        if num_tokens > have:
            self._tokens = torch.cat([self._tokens, source.tokens(have, num_tokens).long().cpu()])
        return self._tokens

    def scores(self, wc, state: FocusState) -> Tensor | None:
        cfg = self.cfg
        if not cfg.streaming and state.phase != "generate":
            return None
        history = self._history(state.source, state.num_tokens)
        query = state.query.long().cpu()[-cfg.query_tokens:]
        # search only what precedes the query, so the query never matches itself
        searched = history[: max(state.num_tokens - query.numel(), 0)]
        w = match_weights(searched, query, cfg.ngram, cfg.max_occurrences)  # [T_searched]
        starts, ends = wc.spans()
        starts, ends = starts.cpu(), ends.cpu()
        levels = wc.levels.cpu()
        match = span_sums(w, starts, ends)  # [E]
        match = torch.where(match >= cfg.min_score, match * cfg.match_scale, torch.zeros_like(match))
        idle = idle_scores(ends, state.num_tokens, cfg.idle_collapse)  # older unmatched raw blocks pay first
        unmatched_raw = (levels == 0) & (match <= 0)
        out = torch.where(unmatched_raw, idle, match)
        return out.to(wc.levels.device)
