"""Evidence-oracle focus: an upper bound on *where* to look, for probes whose evidence location is known.

Far-recall and passkey samples record where their evidence sits (``meta["evidence"]``: token ranges of the
passage that is later repeated, or of the pass-key sentence). :class:`EvidenceFocus` scores the working
context as a perfect pointer would: every gist overlapping the evidence gets a positive score (expand), and
unprotected raw blocks outside it get small negative scores that grow with age, so the allocator pays for the
expansions with the oldest unneeded detail. Everything else is the ordinary MegaContext path (same allocator,
same number of rounds, same budget, same gists), so the gap between this row and the learned policy is what
a better focus could still buy with these gists, and the gap between this row and raw evidence is what the
allocator's limits (rounds, caps, budget) cost.

It is not the counterfactual oracle of :mod:`megacontext.lensnet.oracle` (which measures each entry's
effect on the loss with extra base forwards); it needs no extra forward and is only defined for samples with
evidence ranges (perplexity and QMSum samples have none: it then keeps the recency tiling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacontext.focus import FocusState, idle_scores, span_sums

EVIDENCE_KEY = "evidence"  # FocusState.extras key: list of (start, end) token ranges in the sample's stream


class EvidenceFocus:
    name = "evidence-oracle"

    def __init__(self, expand_score: float = 2.0, idle_collapse: float = 0.05):
        if not expand_score > 0:
            raise ValueError(f"expand_score={expand_score} must be > 0")
        if idle_collapse < 0:
            raise ValueError(f"idle_collapse={idle_collapse} must be >= 0")
        self.expand_score, self.idle_collapse = expand_score, idle_collapse

    def scores(self, wc, state: FocusState) -> Tensor | None:
        ranges = state.extras.get(EVIDENCE_KEY) or []
        n = state.num_tokens
        marks = torch.zeros(n + 1)
        for start, end in ranges:  # a handful of ranges per sample: mark their coverage with a difference array
            a, b = max(int(start), 0), min(int(end), n)
            if a < b:
                marks[a] += 1
                marks[b] -= 1
        if not bool((marks != 0).any()):
            return None  # no evidence visible yet: keep the recency tiling
        covered = (torch.cumsum(marks, 0)[:n] > 0).float()  # [T] 1 where a token is evidence
        starts, ends = (x.cpu() for x in wc.spans())
        levels = wc.levels.cpu()
        hit = span_sums(covered, starts, ends) > 0  # [E]
        idle = idle_scores(ends, n, self.idle_collapse)  # [E]
        out = torch.where(hit & (levels > 0), torch.full_like(idle, self.expand_score), torch.zeros_like(idle))
        out = torch.where(~hit & (levels == 0), idle, out)
        return out.to(wc.levels.device)
