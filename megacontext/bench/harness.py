"""Run systems x tasks x budgets, then aggregate per-target scores into estimates with 95% bootstrap CIs.

Aggregation unit = one sample (a document for the perplexity tasks, one probe otherwise): per-target NLL
is averaged within the unit first, then :func:`megacontext.core.stats.mean_ci` bootstraps over units, so
long documents do not dominate and the interval reflects between-document variation. NaN targets (system
not applicable there, e.g. full attention past its native window) are left out, and units with no finite
target in a group are dropped from that group.

Groups: position buckets for ``books_ppl`` / ``code_ppl`` (by the target's position in its document),
distance for ``far_recall`` / ``passkey``, and ``all`` everywhere. Metrics: ``nll`` (mean per-token NLL);
passkey also ``logprob`` (summed log-probability of the key tokens) and ``accuracy`` (all key tokens top-1).
Cost per scored token: analytic base-forward FLOPs (context rebuilds included) and wall seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from megacontext.bench.system import Sample, Scores, System
from megacontext.core.stats import mean_ci

log = logging.getLogger(__name__)

PPL_TASKS = ("books_ppl", "code_ppl")
DISTANCE_TASKS = ("far_recall", "passkey")


@dataclass
class RunRecord:
    """Raw outcome of one (task, system, w_max): samples and their scores."""

    task: str
    system: str
    w_max: int
    samples: list[Sample]
    scores: list[Scores]
    seconds: float


@dataclass
class BenchResult:
    rows: list[dict] = field(default_factory=list)  # one estimate per (task, system, w_max, metric, group)
    cost: list[dict] = field(default_factory=list)  # one per (task, system, w_max)
    skipped: list[dict] = field(default_factory=list)  # (system, task, reason)


def run_systems(base, systems: list[System], tasks: dict[str, list[Sample]], budgets: tuple[int, ...],
                result: BenchResult) -> list[RunRecord]:
    records = []
    for system in systems:
        for task, samples in tasks.items():
            if task in system.skip_tasks:
                result.skipped.append({"system": system.name, "task": task,
                                       "reason": f"{system.name} does not support {task} (see its docstring)"})
                log.info("skipping %s on %s (not supported by that system)", system.name, task)
                continue
            shared: RunRecord | None = None
            for w in budgets:
                if shared is not None:  # budget-free reference: same scores at every budget
                    records.append(RunRecord(task, system.name, w, samples, shared.scores, shared.seconds))
                    continue
                t0 = time.perf_counter()
                scores = system.score(base, samples, w)
                rec = RunRecord(task, system.name, w, samples, scores, time.perf_counter() - t0)
                log.info("%s / %s / w_max=%d: %d samples in %.1f s", task, system.name, w, len(samples), rec.seconds)
                records.append(rec)
                if getattr(system, "budget_free", False):
                    shared = rec
    return records


def _groups(task: str, sample: Sample, n: int, buckets: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """(group label, boolean mask over the sample's targets) pairs."""
    every = np.ones(n, dtype=bool)
    if task in PPL_TASKS:
        pos = np.arange(sample.target_start, sample.target_end)
        out = [(f"{lo}-{hi}", (pos >= lo) & (pos < hi)) for lo, hi in zip(buckets[:-1], buckets[1:], strict=False)]
        return out + [("all", every)]
    if task in DISTANCE_TASKS:
        return [(str(sample.meta["distance"]), every), ("all", every)]
    return [("all", every)]


def _unit_values(task: str, sample: Sample, score: Scores, mask: np.ndarray) -> dict[str, float]:
    nll = score.nll.numpy()[mask]
    finite = np.isfinite(nll)
    if not finite.any():
        return {}
    out = {"nll": float(nll[finite].mean())}
    if task == "passkey" and finite.all():
        out["logprob"] = float(-nll.sum())
        out["accuracy"] = float(score.top1.numpy()[mask].all())
    return out


def aggregate(records: list[RunRecord], buckets: tuple[int, ...], n_boot: int, seed: int,
              result: BenchResult) -> None:
    for rec in records:
        units: dict[tuple[str, str], list[float]] = {}
        for sample, score in zip(rec.samples, rec.scores, strict=True):
            for group, mask in _groups(rec.task, sample, sample.n_targets, buckets):
                for metric, v in _unit_values(rec.task, sample, score, mask).items():
                    units.setdefault((metric, group), []).append(v)
        for (metric, group), values in units.items():
            est = mean_ci(np.asarray(values), n_boot=n_boot, seed=seed)
            result.rows.append({"task": rec.task, "system": rec.system, "w_max": rec.w_max, "metric": metric,
                                "group": group, **est.to_dict()})
        scored = sum(int(torch.isfinite(s.nll).sum()) for s in rec.scores)
        flops = sum(s.flops for s in rec.scores)
        seconds = sum(s.seconds for s in rec.scores)
        result.cost.append({"task": rec.task, "system": rec.system, "w_max": rec.w_max, "scored_tokens": scored,
                            "flops_per_token": flops / scored if scored else float("nan"),
                            "ms_per_token": 1e3 * seconds / scored if scored else float("nan"),
                            "run_seconds": rec.seconds})
