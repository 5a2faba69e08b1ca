"""The focus-policy contract: who scores the working context's entries between allocator steps.

A policy is any object with ``scores(wc, state) -> Tensor [E]`` (positive = expand, negative = collapse,
the allocator's convention) or ``None`` meaning "no opinion: keep the recency tiling", and a
``query_tokens`` count: how many of the most recent tokens the engine hands it as the query when no
prompt is given (0 = none; the engine then reads nothing for it). Policies live in this package:
:mod:`.recency` (the baseline), :mod:`.lexical` (training-free, query-aware), :mod:`.lens` (LensNet),
:mod:`.oracles` (evaluation references that look at the future or at known evidence);
:mod:`.registry` builds the name-only ones for the engine.

The helpers below are shared by policies that score entries from per-token evidence: :func:`span_sums`
(per-entry sums by cumulative sums, no loop over entries) and :func:`idle_scores` (the age-graded
collapse scores that make the allocator pay for expansions with the oldest unneeded detail first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from megacontext.tree.history import HistorySource

Phase = Literal["ingest", "score", "generate"]


@dataclass
class FocusState:
    """What a policy may read besides the WC: the history (tree) and what is being read now."""

    source: HistorySource | None  # the history the WC tiles (None where a policy needs none, e.g. in tests)
    num_tokens: int
    query: Tensor  # int64 [Q]: the most recent tokens (or the prompt during generation); may be empty
    phase: Phase = "ingest"
    extras: dict = field(default_factory=dict)  # policy-specific inputs (e.g. evidence ranges of a probe)


@runtime_checkable
class FocusPolicy(Protocol):
    name: str
    query_tokens: int  # most recent tokens passed as FocusState.query when no prompt is given (0 = none)

    def scores(self, wc, state: FocusState) -> Tensor | None:
        """[E] float scores for the WC's entries in time order, or None to skip the allocator step."""
        ...


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
