"""Focus policies: who scores the working context's entries between allocator steps.

A policy is any object with ``scores(wc, state) -> Tensor [E]`` (positive = expand, negative = collapse,
the allocator's convention) or ``None`` meaning "no opinion: keep the recency tiling". LensNet and the
oracle plug in through the same protocol. Two policies ship here:

- :class:`RecencyFocus`: always ``None``. The WC's own recency rule (newest raw, older collapsed to LOD1,
  then LOD2) is the whole policy. This is the baseline every learned policy must beat.
- :class:`LexicalFocus`: a query-aware, training-free policy. The *query* is the most recent
  ``query_tokens`` tokens (during generation: the prompt). Every n-gram of the query that also occurs
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

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from megacontext.config import Config, check


@dataclass
class FocusState:
    """What a policy may read besides the WC: the history (tree) and what is being read now."""

    source: object  # a tree / history with tokens(start, end) and num_tokens
    num_tokens: int
    query: Tensor  # int64 [Q]: the most recent tokens (or the prompt during generation)
    phase: str = "ingest"  # ingest | score | generate
    extras: dict = field(default_factory=dict)  # policy-specific inputs (e.g. base-model hidden states)


@runtime_checkable
class FocusPolicy(Protocol):
    name: str

    def scores(self, wc, state: FocusState) -> Tensor | None:
        """[E] float scores for the WC's entries in time order, or None to skip the allocator step."""
        ...


class RecencyFocus:
    """No scores: the WC's recency rule alone decides (see module docstring)."""

    name = "recency"

    def scores(self, wc, state: FocusState) -> Tensor | None:
        return None


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


def idle_scores(ends: Tensor, num_tokens: int, magnitude: float) -> Tensor:
    """Small negative scores [E] for entries ending at ``ends``: older ones more negative (up to ``-magnitude``),
    so the allocator pays for expansions with the oldest unneeded detail first."""
    age = 1.0 - ends.float() / max(num_tokens, 1)  # 0 = newest, -> 1 = oldest
    return -magnitude * (0.2 + 0.8 * age)


def span_sums(per_token: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Sum of per_token over each [start, end) -> [E] (cumulative-sum gather, no loop)."""
    csum = torch.nn.functional.pad(torch.cumsum(per_token, 0), (1, 0))  # [T + 1]
    limit = per_token.numel()
    return csum[ends.clamp(max=limit)] - csum[starts.clamp(max=limit)]


class LexicalFocus:
    """Query-aware, training-free focus by rare n-gram overlap with the query (see module docstring)."""

    name = "lexical"

    def __init__(self, cfg: LexicalFocusConfig | None = None):
        self.cfg = cfg or LexicalFocusConfig()
        self._tokens = torch.empty(0, dtype=torch.long)

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


def make_policy(name: str) -> FocusPolicy:
    """Policy by name: 'recency' or 'lexical' (LensNet/oracle policies are built by their own modules)."""
    if name == "recency":
        return RecencyFocus()
    if name == "lexical":
        return LexicalFocus()
    raise ValueError(f"focus policy {name!r} is not built in; expected 'recency' or 'lexical'")

