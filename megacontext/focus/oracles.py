"""Oracle focus policies: evaluation references that know what a deployable policy cannot.

Neither is deployable; both measure how much a better focus could still buy.

Counterfactual oracle (:class:`OraclePolicy`): scores from the *true* counterfactual utilities of the
current working context. It looks at the future (the next ``horizon`` tokens): at every step it measures,
for the candidates below, the horizon-NLL change of each single expand or collapse
(:func:`megacontext.lensnet.labels.counterfactual_utilities`), turns them into signed targets centred on
the budget-balancing exchange rate (:mod:`megacontext.lensnet.targets`) and divides by the scale LensNet
was trained with, so both policies speak the same units to the allocator, which then acts greedily on
them. Cost control: every collapsible entry is measured, plus up to ``max_expand`` expandable gists (all
LOD2, then the most recent LOD1); unmeasured entries score 0 (neutral). With a few hundred entries per
context this is a few hundred base-model forwards per step, batched.

Evidence oracle (:class:`EvidenceFocus`): an upper bound on *where* to look, for probes whose evidence
location is known. Far-recall and passkey samples record where their evidence sits (``meta["evidence"]``:
token ranges of the passage that is later repeated, or of the pass-key sentence). It scores the working
context as a perfect pointer would: every gist overlapping the evidence gets a positive score (expand),
and unprotected raw blocks outside it get small negative scores that grow with age, so the allocator pays
for the expansions with the oldest unneeded detail. Everything else is the ordinary MegaContext path (same
allocator, rounds, budget and gists), so the gap between this row and the learned policy is what a better
focus could still buy with these gists, and the gap between this row and raw evidence is what the
allocator's limits (rounds, caps, budget) cost. It needs no extra forward and is only defined for samples
with evidence ranges (perplexity and QMSum samples have none: it then keeps the recency tiling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacontext.focus.policy import FocusState, idle_scores, span_sums
from megacontext.lensnet.labels import counterfactual_utilities
from megacontext.lensnet.targets import signed_targets
from megacontext.lensnet.views import DocView, actionable
from megacontext.wc import EntryState


class OraclePolicy:
    name = "oracle"
    query_tokens = 0  # reads the future through its view, not a query

    def __init__(self, base, view: DocView, horizon: int, scale: float = 1.0, max_expand: int = 192,
                 batch_size: int = 32):
        if scale <= 0:
            raise ValueError(f"scale={scale} must be > 0 (the target scale LensNet was trained with)")
        self.base, self.view, self.horizon = base, view, horizon
        self.scale, self.max_expand, self.batch_size = scale, max_expand, batch_size
        self.last_utilities: tuple[Tensor, Tensor] | None = None

    def candidates(self, state: EntryState, t: int, recent_raw: int) -> tuple[Tensor, Tensor]:
        exp_m, col_m = actionable(state, t, recent_raw)
        # priority: the coarsest gists first (largest spans), then the most recent LOD1; a deterministic order
        pri = torch.where(state.levels >= 2, state.levels << 40, 0) + state.indices * (state.levels == 1)
        pri = pri.masked_fill(~exp_m, -1)
        k = min(self.max_expand, int(exp_m.sum()))
        e_idx = pri.argsort(descending=True)[:k].sort().values
        return e_idx, col_m.nonzero().squeeze(1)

    def score_state(self, state: EntryState, t: int, recent_raw: int, horizon_ids: Tensor | None = None) -> Tensor:
        """Signed oracle scores [E] for a tiling of history length t."""
        e_idx, c_idx = self.candidates(state, t, recent_raw)
        gain, loss, _ = counterfactual_utilities(self.base, self.view, state, t, self.horizon, e_idx, c_idx,
                                                 self.batch_size)
        self.last_utilities = (gain, loss)
        target, _ = signed_targets(gain[None], loss[None])
        return (target[0] / self.scale).nan_to_num(0.0)

    def scores(self, wc, state=None) -> Tensor:
        return self.score_state(wc.state, wc.num_tokens, wc.cfg.recent_raw).to(wc.levels.device)


EVIDENCE_KEY = "evidence"  # FocusState.extras key: list of (start, end) token ranges in the sample's stream


class EvidenceFocus:
    name = "evidence-oracle"
    query_tokens = 0  # reads the evidence ranges in FocusState.extras

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
