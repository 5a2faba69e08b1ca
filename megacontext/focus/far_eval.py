"""Held-out far-context evaluation of focus policies: how much of the recency-to-oracle gap a policy closes.

For each held-out item (:mod:`megacontext.lensnet.far_data`: a history whose question needs a far span) and
each budget: the recency tiling of ``[0, t)``; then every policy runs ``rounds`` refocus steps with the
question (the last ``tail`` tokens) as the query, passing its ``last_targets`` to the allocator (multi-level
moves), and we measure the answer's mean NLL (variant 0) and the fraction of evidence tokens held raw.
The evidence oracle (:class:`~megacontext.focus.oracles.EvidenceFocus`) is the upper reference.

``gap_closed`` per policy and budget is ``(NLL_recency - NLL_policy) / (NLL_recency - NLL_oracle)`` as a
ratio of means over items, with a 95% bootstrap interval that resamples items jointly (paired).
"""

from __future__ import annotations

import torch

from megacontext.core.stats import gap_recovered, mean_ci
from megacontext.focus.evaluation import evidence_raw_fraction, wc_nll
from megacontext.focus.oracles import EVIDENCE_KEY, EvidenceFocus
from megacontext.focus.policy import FocusState
from megacontext.lensnet.views import DocSource, DocView
from megacontext.wc import AllocatorConfig, WorkingContext, WorkingContextConfig


def run_policy(base, view: DocView, item, w_max: int, policy, rounds: int, recent_raw: int, tail: int,
               alloc: AllocatorConfig) -> dict:
    t = item.t
    wc = WorkingContext.assemble(t, WorkingContextConfig(w_max=w_max, recent_raw=recent_raw), device=view.ids.device)
    state = FocusState(DocSource(view, t), t, view.ids[t - tail:t], "generate", {EVIDENCE_KEY: item.evidence})
    for _ in range(rounds if policy is not None else 0):
        scores = policy.scores(wc, state)
        if scores is None:
            break
        targets = getattr(policy, "last_targets", None)
        wc.refocus(scores, alloc, targets=targets if targets is not None and targets.shape == scores.shape else None)
    h = int(item.variants[0][1].shape[0])
    return {"nll": wc_nll(base, view, wc, h), "evidence_raw": evidence_raw_fraction(wc, item.evidence)}


@torch.no_grad()
def far_rows(base, compressor, items: list, policies: dict, budgets=(1024, 2048), rounds: int = 4,
             recent_raw: int = 64, tail: int = 64, alloc: AllocatorConfig | None = None) -> list[dict]:
    """Per item: ``{"kind", budget: {policy: {"nll", "evidence_raw"}}}`` for ``recency``, every policy in
    ``policies`` (name -> policy) and ``oracle``."""
    alloc = alloc or AllocatorConfig()
    allp = {"recency": None, **policies, "oracle": EvidenceFocus()}
    rows = []
    for item in items:
        view = DocView.build(base, compressor, item.ids(0))
        rows.append({"kind": item.kind, **{b: {name: run_policy(base, view, item, b, pol, rounds, recent_raw, tail,
                                                                 alloc) for name, pol in allp.items()}
                                           for b in budgets}})
    return rows


def summarise(rows: list[dict], budgets=(1024, 2048)) -> dict:
    """Per budget: mean NLL (95% interval), evidence held raw, and ``gap_closed`` of every non-reference policy."""
    out: dict = {}
    for b in budgets:
        names = list(rows[0][b]) if rows else []
        nll = {p: torch.tensor([r[b][p]["nll"] for r in rows]).numpy() for p in names}
        res: dict = {"items": len(rows)}
        for p in names:
            ev = torch.tensor([r[b][p]["evidence_raw"] for r in rows])
            res[p] = {"nll": mean_ci(nll[p]).to_dict(), "evidence_raw": float(ev.nanmean())}
            if p not in ("recency", "oracle"):
                res[p]["gap_closed"] = gap_recovered(nll["recency"], nll[p], nll["oracle"]).to_dict()
        out[str(b)] = res
    return out


def far_gap(base, compressor, items: list, policies: dict, budgets=(1024, 2048), rounds: int = 4,
            recent_raw: int = 64, tail: int = 64, alloc: AllocatorConfig | None = None) -> dict:
    """:func:`summarise` of :func:`far_rows` (see module docstring)."""
    return summarise(far_rows(base, compressor, items, policies, budgets, rounds, recent_raw, tail, alloc), budgets)
