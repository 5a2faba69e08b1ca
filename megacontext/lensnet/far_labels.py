"""Counterfactual labels on far-context histories (:mod:`megacontext.lensnet.far_data`), time-boxed.

Per item: one :class:`~megacontext.lensnet.views.DocView` (gists computed once), then ``contexts_per_item``
sampled tilings at a budget drawn from ``budgets``. In each tiling up to ``max_labels`` entries are labelled:
every expandable gist overlapping the evidence (up to half the labels; these carry the signal) plus random
expandable and collapsible entries (the negatives and the exchange rate). Utilities (horizon-NLL change of
expanding / collapsing one entry, :func:`~megacontext.lensnet.labels.counterfactual_utilities`) are averaged
over the item's variants (phrasings), which share every entry and differ only inside the protected tail.

Output: the label-cache format of :mod:`megacontext.lensnet.labels` (``meta.json`` + shards, with the
lexical feature), so ``train_lensnet`` and ``evaluate`` read it unchanged. The run stops starting new items
once ``seconds`` have passed (a shard is always completed), so a fixed device budget gives as many
contexts as the hardware affords; the stats say how many.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, entry_bounds
from megacontext.lensnet.far_data import FarConfig, FarItem
from megacontext.lensnet.labels import META, context_record, counterfactual_utilities, save_shard
from megacontext.lensnet.views import DocView, actionable, sample_tiling
from megacontext.tree.lexical_source import SourceIndex

log = logging.getLogger(__name__)


@dataclass
class FarLabelConfig(Config):
    budgets: tuple[int, ...] = (1024, 2048)
    recent_raw: int = 64  # >= FarConfig.query_len: the variants differ only in protected blocks
    contexts_per_item: int = 4
    max_labels: int = 12
    perturb: int = 6
    tail_tokens: int = 64
    batch_size: int = 256  # variants per base forward
    shard_size: int = 256
    seconds: float = 300.0  # stop starting new items after this long
    seed: int = 0
    data: FarConfig = field(default_factory=FarConfig)

    def __post_init__(self):
        check(self.recent_raw >= self.data.query_len,
              f"recent_raw={self.recent_raw} must be >= data.query_len={self.data.query_len}")
        check(self.contexts_per_item >= 1 and self.max_labels >= 2 and self.batch_size >= 1,
              f"contexts_per_item={self.contexts_per_item}, max_labels={self.max_labels}, "
              f"batch_size={self.batch_size}: need >= 1, >= 2, >= 1")
        check(self.seconds > 0, f"seconds={self.seconds} must be > 0")


def evidence_mask(state, evidence: list[tuple[int, int]]) -> torch.Tensor:
    """Bool [E]: entries whose span overlaps any evidence range."""
    start, end = entry_bounds(state.levels, state.indices)
    hit = torch.zeros_like(start, dtype=torch.bool)
    for a, b in evidence:  # a handful of ranges per item
        hit |= (start < b) & (end > a)
    return hit


def _pick(mask: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    r = torch.rand(mask.shape[0], generator=g).to(mask.device).masked_fill(~mask, 2.0)
    return r.argsort()[: min(k, int(mask.sum()))]


def label_item(base, compressor, item: FarItem, cfg: FarLabelConfig, g: torch.Generator) -> list[dict]:
    """``contexts_per_item`` labelled context records of one item (tensors on CPU)."""
    dev = base.device
    view0 = DocView.build(base, compressor, item.ids(0))
    views = [view0] + [DocView(item.ids(v).to(dev), view0.lod1, view0.lod2) for v in range(1, len(item.variants))]
    t, lex, out = item.t, SourceIndex(), []
    for _ in range(cfg.contexts_per_item):
        w_max = cfg.budgets[int(torch.randint(len(cfg.budgets), (1,), generator=g))]
        n_e, n_c = (int(torch.randint(0, cfg.perturb + 1, (1,), generator=g)) for _ in range(2))
        state = sample_tiling(t, w_max, cfg.recent_raw, n_e, n_c, g, device=dev)
        exp_m, col_m = actionable(state, t, cfg.recent_raw)
        ev = evidence_mask(state, item.evidence).to(dev)
        e_ev = _pick(exp_m & ev, cfg.max_labels // 2, g)
        n_c_lab = min(int(col_m.sum()), (cfg.max_labels - e_ev.numel()) // 2)
        c_idx = _pick(col_m, n_c_lab, g).sort().values
        rest = exp_m.clone()
        rest[e_ev] = False
        e_idx = torch.cat([e_ev, _pick(rest, cfg.max_labels - e_ev.numel() - c_idx.numel(), g)]).sort().values
        gains, losses, nlls = [], [], []
        for v, view in enumerate(views):  # average the utilities over the phrasings
            h = int(item.variants[v][1].shape[0])
            gain, loss, nll0 = counterfactual_utilities(base, view, state, t, h, e_idx, c_idx, cfg.batch_size)
            gains.append(gain)
            losses.append(loss)
            nlls.append(float(nll0))
        out.append({**context_record(base, view0, state, t, cfg.tail_tokens, lex),
                    "expandable": exp_m.cpu(), "collapsible": col_m.cpu(),
                    "gain": torch.stack(gains).mean(0).float().cpu(), "loss": torch.stack(losses).mean(0).float().cpu(),
                    "nll": sum(nlls) / len(nlls), "t": t, "w_max": w_max,
                    "n_labels": int(e_idx.numel() + c_idx.numel()), "evidence_labels": int(e_ev.numel())})
    return out


def generate_far_labels(base, compressor, items: list[FarItem], cfg: FarLabelConfig, out_dir: str | Path,
                        compressor_version: str = "unknown") -> dict:
    """Label items in order into ``out_dir`` until they run out or ``cfg.seconds`` pass. Returns stats."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted({it.source for it in items})
    doc_of = {s: i for i, s in enumerate(sources)}
    (out / META).write_text(json.dumps({"config": json.loads(json.dumps(cfg.to_dict())),
                                        "base_fingerprint": base.fingerprint, "compressor": compressor_version,
                                        "docs": sources, "kind": "far"}, indent=2, sort_keys=True))
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    records, docs, shard, stats = [], [], 0, {"items": 0, "contexts": 0, "labels": 0, "evidence_labels": 0}
    by_kind: dict[str, int] = {}
    for it in items:
        if time.perf_counter() - start > cfg.seconds:
            break
        if it.t % BLOCK == 0:  # items are built block-aligned; anything else is skipped
            recs = label_item(base, compressor, it, cfg, g)
            records += recs
            docs += [doc_of[it.source]] * len(recs)
            stats["items"] += 1
            by_kind[it.kind] = by_kind.get(it.kind, 0) + len(recs)
            stats["labels"] += sum(r["n_labels"] for r in recs)
            stats["evidence_labels"] += sum(r["evidence_labels"] for r in recs)
        while len(records) >= cfg.shard_size:
            save_shard(out / f"shard_{shard:05d}.safetensors", records[: cfg.shard_size], docs[: cfg.shard_size])
            records, docs, shard = records[cfg.shard_size:], docs[cfg.shard_size:], shard + 1
            stats["contexts"] += cfg.shard_size
    if records:
        save_shard(out / f"shard_{shard:05d}.safetensors", records, docs)
        stats["contexts"] += len(records)
    stats.update(seconds=round(time.perf_counter() - start, 1), by_kind=by_kind)
    stats["labels_per_s"] = round(stats["labels"] / max(stats["seconds"], 1e-9), 1)
    log.info("far labels: %s", stats)
    return stats
