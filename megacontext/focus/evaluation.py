"""``eval focus``: does LensNet focus better than recency, and how close does it get to the oracle?

End to end over long documents, per budget ``w_max``: at each evaluation point a working context is
assembled by recency ``steps * 32`` tokens before the point, then the history grows 32 tokens per step
(``WorkingContext.sync``) and, for LensNet and the oracle, the allocator refocuses after every step. After
each step we measure the NLL of the next ``horizon`` tokens under the current tiling. Reported per policy:
mean horizon NLL, the fraction of the recency-to-oracle gap LensNet closes, swap rate (changed blocks per
complete block per step, from the allocator's telemetry, excluding the first step which moves from the
recency tiling) and residency (steps an entry spent at its level before changing).

:func:`run_focus_eval` is the whole ``eval focus`` command: held-out documents (every ``holdout_every``-th,
the ones ``train lensnet`` never labels), the end-to-end comparison, optionally the ranking quality on a
held-out label cache and the QMSum evidence test, written as one JSON report.

QMSum: the transcript is the history, ``"\\nQuery: <q>\\nAnswer:"`` ends it, the answer is the horizon.
After ``qmsum_steps`` refocus steps with no new tokens we report the fraction of evidence tokens (the
query's ``relevant_text_span`` turns) held raw (LOD0) and the answer NLL, for recency vs LensNet.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from megacontext.core.assets import LENSNET_MODEL
from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK
from megacontext.data.documents import load_docs, split_docs
from megacontext.focus.lens import LensPolicy
from megacontext.focus.oracles import OraclePolicy
from megacontext.focus.policy import FocusState
from megacontext.lensnet.labels import variant_nll
from megacontext.lensnet.runs import DocRunConfig, load_models
from megacontext.lensnet.views import DocSource, DocView
from megacontext.wc import AllocatorConfig, WorkingContext, WorkingContextConfig

log = logging.getLogger(__name__)

_NO_QUERY = torch.zeros(0, dtype=torch.long)  # streaming steps: policies read the history's tail themselves


@dataclass
class FocusEvalConfig(Config):
    budgets: tuple[int, ...] = (1024, 2048)
    recent_raw: int = 64
    horizon: int = 64
    points: int = 8  # evaluation points per budget (spread over the documents)
    steps: int = 8  # 32-token steps per point, each followed by a refocus and a measurement
    min_history: int = 16384
    oracle_max_expand: int = 192
    batch_size: int = 32
    qmsum_queries: int = 24
    qmsum_steps: int = 4
    qmsum_budget: int = 1024
    seed: int = 1234
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)

    def __post_init__(self):
        check(len(self.budgets) >= 1, f"budgets={self.budgets} must not be empty")
        check(self.horizon >= 1 and self.points >= 1 and self.steps >= 1,
              f"horizon={self.horizon}, points={self.points}, steps={self.steps} must be >= 1")
        check(self.min_history % BLOCK == 0, f"min_history={self.min_history} must be a multiple of {BLOCK}")


def wc_nll(base, view: DocView, wc: WorkingContext, horizon: int) -> float:
    tok, rows, pos = view.entry_slots(wc.levels, wc.indices)
    return float(variant_nll(base, view, tok[None], rows[None], pos[None], wc.num_tokens, horizon, 1)[0])


def run_point(base, view: DocView, t_end: int, w_max: int, policy, cfg: FocusEvalConfig) -> dict:
    wcfg = WorkingContextConfig(w_max=w_max, recent_raw=cfg.recent_raw)
    t0 = t_end - cfg.steps * BLOCK
    wc = WorkingContext.assemble(t0, wcfg, device=view.ids.device)
    nlls, swaps, resid = [], [], []
    for s in range(cfg.steps):
        t = t0 + (s + 1) * BLOCK
        wc.sync(t)
        if policy is not None:
            scores = policy.scores(wc, FocusState(DocSource(view, t), t, _NO_QUERY))
            tel = wc.refocus(scores, cfg.allocator)
            if s > 0:
                swaps.append(float(tel.swap_rate))
                r = float(tel.residency_changed)
                if not math.isnan(r):
                    resid.append(r)
        nlls.append(wc_nll(base, view, wc, cfg.horizon))
    return {"nll": sum(nlls) / len(nlls), "swap_rate": sum(swaps) / len(swaps) if swaps else 0.0,
            "residency": sum(resid) / len(resid) if resid else float("nan"),
            "lod0_entries": int((wc.levels == 0).sum()), "entries": len(wc)}


def end_to_end(base, compressor, docs: list[torch.Tensor], lens: LensPolicy | None, scale: float,
               cfg: FocusEvalConfig) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    usable = [i for i, d in enumerate(docs) if d.shape[0] >= cfg.min_history + cfg.horizon]
    if not usable:
        raise ValueError(f"no document has >= {cfg.min_history + cfg.horizon} tokens for the focus evaluation")
    views: dict[int, DocView] = {}
    results: dict = {}
    for w_max in cfg.budgets:
        rows = []
        for p in tqdm(range(cfg.points), desc=f"focus w_max={w_max}"):
            d = usable[p % len(usable)]
            if d not in views:
                views[d] = DocView.build(base, compressor, docs[d])
            view = views[d]
            lo, hi = cfg.min_history // BLOCK, (view.num_tokens - cfg.horizon) // BLOCK
            t_end = int(torch.randint(lo, hi + 1, (1,), generator=gen)) * BLOCK
            row = {"doc": d, "t": t_end, "recency": run_point(base, view, t_end, w_max, None, cfg),
                   "oracle": run_point(base, view, t_end, w_max, OraclePolicy(
                       base, view, cfg.horizon, scale, cfg.oracle_max_expand, cfg.batch_size), cfg)}
            if lens is not None:
                row["lensnet"] = run_point(base, view, t_end, w_max, lens, cfg)
            rows.append(row)
        results[str(w_max)] = summarise(rows)
    return results


def summarise(rows: list[dict]) -> dict:
    pols = [p for p in ("recency", "lensnet", "oracle") if p in rows[0]]
    out: dict = {"points": len(rows)}
    for p in pols:
        out[p] = {k: sum(r[p][k] for r in rows) / len(rows) for k in ("nll", "swap_rate", "residency")}
    if "lensnet" in pols:
        gap = out["recency"]["nll"] - out["oracle"]["nll"]
        got = out["recency"]["nll"] - out["lensnet"]["nll"]
        out["gap_closed"] = got / gap if abs(gap) > 1e-9 else float("nan")
        out["gap_nats"] = gap
    return out


# ---------------------------------------------------------------------------------------------- QMSum
def qmsum_items(base, meetings, n: int) -> list[dict]:
    """(history ids, answer ids, evidence token ranges) for up to n specific queries with evidence spans."""
    from megacontext.data.tokenization import encode_with_char_map

    items = []
    for doc in meetings:
        ids, turn_tok = encode_with_char_map(base.tokenizer, doc.text, doc.meta["turn_chars"], "int64")
        ids = torch.as_tensor(ids, dtype=torch.long)
        ends = list(turn_tok[1:]) + [len(ids)]
        for q in doc.meta["queries"]["specific"]:
            if not q.get("relevant_text_span") or len(items) >= n:
                continue
            query = torch.tensor(base.encode(f"\nQuery: {q['query']}\nAnswer:"), dtype=torch.long)
            answer = torch.tensor(base.encode(" " + q["answer"]), dtype=torch.long)[:64]
            hist = torch.cat([ids, query])
            cut = hist.shape[0] % BLOCK  # drop the first tokens so the history is block-aligned
            spans = [(int(turn_tok[a]) - cut, int(ends[b]) - cut) for a, b in q["relevant_text_span"]]
            items.append({"ids": torch.cat([hist[cut:], answer]), "t": hist.shape[0] - cut,
                          "horizon": answer.shape[0], "evidence": spans, "query": query})
        if len(items) >= n:
            break
    return items


def evidence_raw_fraction(wc: WorkingContext, spans: list[tuple[int, int]]) -> float:
    start, end = wc.spans()
    raw_tok = torch.zeros(wc.num_tokens, dtype=torch.bool)
    for s, e in zip(start[wc.levels == 0].tolist(), end[wc.levels == 0].tolist(), strict=True):
        raw_tok[s:e] = True
    ev = torch.zeros(wc.num_tokens, dtype=torch.bool)
    for a, b in spans:
        ev[max(a, 0):max(b, 0)] = True
    return float(raw_tok[ev].float().mean()) if bool(ev.any()) else float("nan")


def qmsum_eval(base, compressor, items: list[dict], lens: LensPolicy | None, cfg: FocusEvalConfig) -> dict:
    rows = []
    for it in tqdm(items, desc="qmsum"):
        view = DocView.build(base, compressor, it["ids"])
        t, h = it["t"], it["horizon"]
        wcfg = WorkingContextConfig(w_max=cfg.qmsum_budget, recent_raw=cfg.recent_raw)
        row = {}
        for name, pol in (("recency", None), ("lensnet", lens)):
            if name == "lensnet" and pol is None:
                continue
            wc = WorkingContext.assemble(t, wcfg, device=view.ids.device)
            for _ in range(cfg.qmsum_steps if pol is not None else 0):
                st = FocusState(DocSource(view, t), t, it["query"].to(view.ids.device), "generate")
                wc.refocus(pol.scores(wc, st), cfg.allocator)
            row[name] = {"evidence_raw": evidence_raw_fraction(wc, it["evidence"]),
                         "answer_nll": wc_nll(base, view, wc, h)}
        rows.append(row)
    out: dict = {"queries": len(rows)}
    for name in rows[0] if rows else []:
        vals = [r[name]["evidence_raw"] for r in rows if not math.isnan(r[name]["evidence_raw"])]
        out[name] = {"evidence_raw": sum(vals) / max(len(vals), 1),
                     "answer_nll": sum(r[name]["answer_nll"] for r in rows) / len(rows)}
    return out


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class FocusRunConfig(DocRunConfig):
    lensnet: str = LENSNET_MODEL  # LensNet checkpoint; empty = recency and oracle only
    qmsum: str = ""  # a QMSum split directory for the evidence test; empty = skip
    labels: str = ""  # a held-out label cache for the ranking metrics (Spearman); empty = skip
    out: str = "runs/lensnet/focus_eval.json"  # the JSON report
    eval: FocusEvalConfig = field(default_factory=FocusEvalConfig)


def run_focus_eval(cfg: FocusRunConfig) -> dict:
    """The ``eval focus`` report (also written to ``cfg.out``)."""
    from megacontext.lensnet.labels import LabelSet
    from megacontext.lensnet.train import LensTrainConfig, evaluate, target_scale

    base, comp, _ = load_models(cfg.base, cfg.gistnet, cfg.device, cfg.dtype)
    lens, scale, report = None, 1.0, {"config": cfg.to_dict()}
    if cfg.lensnet:
        from megacontext.lensnet.model import LensNet

        net, meta = LensNet.load(cfg.lensnet, base)
        lens, scale = LensPolicy(net, base), float(meta.get("target_scale", 1.0))
        if cfg.labels:
            labels = LabelSet.load(cfg.labels)
            report["ranking"] = evaluate(net, base, labels, scale, LensTrainConfig().loss)
            report["ranking"]["contexts"] = len(labels)
    elif cfg.labels:  # without a LensNet, express the oracle in the label cache's units
        scale = target_scale(LabelSet.load(cfg.labels))
    docs, _ = split_docs(*load_docs(cfg.docs, base.encode), cfg.holdout_every, held_out=True)
    report["end_to_end"] = end_to_end(base, comp, docs, lens, scale, cfg.eval)
    if cfg.qmsum:
        from megacontext.data.qmsum import read_qmsum

        items = qmsum_items(base, read_qmsum([cfg.qmsum]), cfg.eval.qmsum_queries)
        report["qmsum"] = qmsum_eval(base, comp, items, lens, cfg.eval)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=2))
    return report
