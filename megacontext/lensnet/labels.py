"""Counterfactual focus labels: for sampled working contexts, the horizon-NLL change of changing one entry.

For a document, a history length ``t`` (block-aligned) and a legal tiling of ``[0, t)`` at budget ``w_max``,
the base model reads the tiling followed by the next ``horizon`` tokens, and we record per entry
- ``gain``: NLL(current) - NLL(entry expanded), for gists;
- ``loss``: NLL(entry collapsed) - NLL(current), for unprotected LOD0 blocks and LOD1 sibling-run starts;
both in nats per horizon token, everything else fixed. NaN marks "not applicable or not sampled".

Throughput: all variants of one kind have the same length (see :mod:`megacontext.lensnet.views`), so they
go through the base model ``batch_size`` at a time with no padding; labels/s is logged and returned.

Cache layout (``out_dir``): ``meta.json`` (config, base fingerprint, compressor version, seed) and shards
``shard_NNNNN.safetensors``, each holding ``shard_size`` contexts as flat entry tensors plus ``offsets``
(entry tensors include ``lexical [E, 3]``, LensNet's BM25 feature; caches made before it load with zeros).
Shard ``k`` is generated from ``seed + k`` alone, so an interrupted run resumes by skipping finished shards
and reproduces the same labels; a cache made with another config or base model is refused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK
from megacontext.lensnet.lexfeat import LEX_FEATURES, source_features
from megacontext.lensnet.views import (
    DOC_LEVELS,
    DocSource,
    DocView,
    actionable,
    collapse_variants,
    entry_ages,
    expand_variants,
    sample_tiling,
)
from megacontext.tree.lexical_source import SourceIndex
from megacontext.wc import EntryState, min_cost

log = logging.getLogger(__name__)

META = "meta.json"


@dataclass
class LabelConfig(Config):
    budgets: tuple[int, ...] = (1024, 2048)  # w_max of sampled contexts (one drawn per context)
    recent_raw: int = 64  # protected recent tokens
    horizon: int = 64  # tokens whose NLL defines utility
    min_history: int = 4096  # earliest history length sampled
    contexts: int = 256  # working contexts to label
    max_labels: int = 64  # entries labelled per context (half expansions, half collapses when possible)
    perturb: int = 6  # up to this many random expansions and collapses away from the recency tiling
    tail_tokens: int = 64  # recent token ids stored per context for LensNet's tail
    batch_size: int = 32  # variants per base-model forward
    shard_size: int = 32  # contexts per shard
    seed: int = 0

    def __post_init__(self):
        check(len(self.budgets) >= 1 and all(b >= 2 * BLOCK for b in self.budgets),
              f"budgets={self.budgets} must be a non-empty list of w_max values >= {2 * BLOCK}")
        check(self.recent_raw >= 0, f"recent_raw={self.recent_raw} must be >= 0")
        check(self.horizon >= 1, f"horizon={self.horizon} must be >= 1")
        check(self.min_history >= BLOCK and self.min_history % BLOCK == 0,
              f"min_history={self.min_history} must be a positive multiple of {BLOCK}")
        check(self.contexts >= 1, f"contexts={self.contexts} must be >= 1")
        check(self.max_labels >= 2, f"max_labels={self.max_labels} must be >= 2")
        check(self.perturb >= 0, f"perturb={self.perturb} must be >= 0")
        check(self.tail_tokens >= 1, f"tail_tokens={self.tail_tokens} must be >= 1")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.shard_size >= 1, f"shard_size={self.shard_size} must be >= 1")


@torch.no_grad()
def variant_nll(base, view: DocView, tok: Tensor, rows: Tensor, pos: Tensor, t: int, horizon: int,
                batch_size: int) -> Tensor:
    """Mean horizon NLL [n] of n same-length slot sequences [n, L], each followed by tokens [t, t+H)."""
    target = view.ids[t:t + horizon]  # [H]
    h_emb = base.embed(target)  # [H, d]
    h_pos = torch.arange(t, t + horizon, device=pos.device)
    out = []
    for i in range(0, tok.shape[0], batch_size):
        n = min(batch_size, tok.shape[0] - i)
        emb = torch.cat([view.embed_slots(base, tok[i:i + n], rows[i:i + n]), h_emb.expand(n, -1, -1)], 1)
        p = torch.cat([pos[i:i + n], h_pos.expand(n, -1)], 1)  # [n, L + H]
        out.append(base.nll(emb, p, target.expand(n, -1)).mean(1))
    return torch.cat(out) if out else torch.empty(0, device=pos.device)


@torch.no_grad()
def counterfactual_utilities(base, view: DocView, state: EntryState, t: int, horizon: int, expand_idx: Tensor,
                             collapse_idx: Tensor, batch_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """-> (gain [E], loss [E], nll of the unchanged context (0-dim)); NaN where not requested."""
    if t + horizon > view.num_tokens:
        raise ValueError(f"history t={t} + horizon={horizon} exceeds the document ({view.num_tokens} tokens)")
    tok, rows, pos = view.entry_slots(state.levels, state.indices)
    nll0 = variant_nll(base, view, tok[None], rows[None], pos[None], t, horizon, 1)[0]
    e = len(state)
    gain = torch.full((e,), float("nan"), device=pos.device)
    loss = gain.clone()
    if expand_idx.numel():
        nll = variant_nll(base, view, *expand_variants(view, state, expand_idx), t, horizon, batch_size)
        gain[expand_idx] = nll0 - nll
    if collapse_idx.numel():
        nll = variant_nll(base, view, *collapse_variants(view, state, collapse_idx), t, horizon, batch_size)
        loss[collapse_idx] = nll - nll0
    return gain, loss, nll0


def _pick(mask: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Up to k random indices where mask is True (sorted)."""
    r = torch.rand(mask.shape[0], generator=gen).to(mask.device).masked_fill(~mask, 2.0)
    k = min(k, int(mask.sum()))
    return r.argsort()[:k].sort().values


def context_record(base, view: DocView, state: EntryState, t: int, tail_tokens: int, lex: SourceIndex | None = None
                   ) -> dict:
    """The inputs LensNet reads for the tiling ``state`` of ``[0, t)`` (tensors on CPU): entry vectors, levels,
    indices, ages, the tail ids (left-padded with -1) and the lexical feature of every entry against that tail
    (:mod:`megacontext.lensnet.lexfeat`; ``lex`` caches the document's index between contexts)."""
    tail = view.ids[max(t - tail_tokens, 0):t]
    tail = torch.nn.functional.pad(tail, (tail_tokens - tail.shape[0], 0), value=-1)  # -1 = no token
    feats, _ = source_features(lex or SourceIndex(), DocSource(view, t), t, tail.cpu(), state.levels, state.indices)
    return {"entries": view.entry_vectors(base, state.levels, state.indices).half().cpu(),
            "levels": state.levels.cpu(), "indices": state.indices.cpu(),
            "ages": entry_ages(state.levels, state.indices, t).cpu(), "tail": tail.cpu(), "lexical": feats.half()}


def label_context(base, view: DocView, t: int, w_max: int, cfg: LabelConfig, gen: torch.Generator,
                  lex: SourceIndex | None = None) -> dict:
    """Sample one tiling at (t, w_max) and label it. Returns the context record (tensors on CPU)."""
    n_exp = int(torch.randint(0, cfg.perturb + 1, (1,), generator=gen))
    n_col = int(torch.randint(0, cfg.perturb + 1, (1,), generator=gen))
    state = sample_tiling(t, w_max, cfg.recent_raw, n_exp, n_col, gen, device=view.ids.device)
    exp_m, col_m = actionable(state, t, cfg.recent_raw)
    n_c = min(int(col_m.sum()), cfg.max_labels // 2)
    e_idx = _pick(exp_m, cfg.max_labels - n_c, gen)
    c_idx = _pick(col_m, n_c, gen)
    gain, loss, nll0 = counterfactual_utilities(base, view, state, t, cfg.horizon, e_idx, c_idx, cfg.batch_size)
    return {
        **context_record(base, view, state, t, cfg.tail_tokens, lex),
        "expandable": exp_m.cpu(), "collapsible": col_m.cpu(),
        "gain": gain.float().cpu(), "loss": loss.float().cpu(),
        "nll": float(nll0), "t": t, "w_max": w_max, "n_labels": int(e_idx.numel() + c_idx.numel()),
    }


ENTRY_KEYS = ("entries", "levels", "indices", "ages", "expandable", "collapsible", "gain", "loss", "lexical")


def save_shard(path: Path, records: list[dict], doc_ids: list[int]) -> None:
    flat = {k: torch.cat([r[k] for r in records]).contiguous() for k in ENTRY_KEYS}
    sizes = torch.tensor([r["levels"].shape[0] for r in records])
    flat["offsets"] = torch.nn.functional.pad(torch.cumsum(sizes, 0), (1, 0))
    flat["tail"] = torch.stack([r["tail"] for r in records])
    flat["nll"] = torch.tensor([r["nll"] for r in records])
    flat["t"] = torch.tensor([r["t"] for r in records])
    flat["w_max"] = torch.tensor([r["w_max"] for r in records])
    flat["doc"] = torch.tensor(doc_ids)
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp))
    tmp.replace(path)


def _check_meta(out: Path, meta: dict) -> None:
    f = out / META
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as stored
    if f.is_file():
        old = json.loads(f.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"label cache {str(out)!r} was made with different settings ({diff}); "
                             "use another directory or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(meta, indent=2, sort_keys=True))


def generate_labels(base, compressor, docs: list[Tensor], cfg: LabelConfig, out_dir: str | Path,
                    compressor_version: str = "unknown", doc_names: list[str] | None = None) -> dict:
    """Label ``cfg.contexts`` contexts over ``docs`` (1-D token id tensors) into ``out_dir``. Returns stats
    (contexts, labels, seconds, labels_per_s over the shards made in this call)."""
    out = Path(out_dir)
    usable = [i for i, d in enumerate(docs) if d.shape[0] >= cfg.min_history + cfg.horizon]
    if not usable:
        raise ValueError(f"no document is long enough: need >= {cfg.min_history + cfg.horizon} tokens "
                         f"(min_history + horizon), longest has {max((d.shape[0] for d in docs), default=0)}")
    _check_meta(out, {"config": cfg.to_dict(), "base_fingerprint": base.fingerprint,
                      "compressor": compressor_version, "docs": doc_names or [str(i) for i in range(len(docs))]})
    n_shards = -(-cfg.contexts // cfg.shard_size)
    views: dict[int, DocView] = {}
    lex: dict[int, SourceIndex] = {}  # per document: its lexical index, grown to the longest prefix labelled
    made_labels, made_ctx, seconds = 0, 0, 0.0
    bar = tqdm(total=cfg.contexts, desc="labels", unit="ctx")
    for k in range(n_shards):
        path = out / f"shard_{k:05d}.safetensors"
        n_here = min(cfg.shard_size, cfg.contexts - k * cfg.shard_size)
        if path.is_file():
            bar.update(n_here)
            continue
        gen = torch.Generator().manual_seed(cfg.seed + k)
        records, doc_ids = [], []
        start = time.perf_counter()
        for _ in range(n_here):
            d = usable[int(torch.randint(len(usable), (1,), generator=gen))]
            if d not in views:
                views[d] = DocView.build(base, compressor, docs[d])
            view = views[d]
            w_max = cfg.budgets[int(torch.randint(len(cfg.budgets), (1,), generator=gen))]
            lo = cfg.min_history // BLOCK
            hi = (view.num_tokens - cfg.horizon) // BLOCK
            t = int(torch.randint(lo, hi + 1, (1,), generator=gen)) * BLOCK
            # long docs at small budgets: move earlier
            while min_cost(t, cfg.recent_raw, DOC_LEVELS) > w_max and t > BLOCK:
                t //= 2
                t -= t % BLOCK
            rec = label_context(base, view, t, w_max, cfg, gen, lex.setdefault(d, SourceIndex()))
            records.append(rec)
            doc_ids.append(d)
            made_labels += rec["n_labels"]
            bar.update(1)
        if base.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        made_ctx += len(records)
        save_shard(path, records, doc_ids)
    bar.close()
    stats = {"contexts": made_ctx, "labels": made_labels, "seconds": round(seconds, 2),
             "labels_per_s": round(made_labels / seconds, 1) if seconds > 0 else None}
    log.info("labels: %s", stats)
    return stats


class LabelSet:
    """All contexts of a label cache, in memory, served as padded batches."""

    def __init__(self, shards: list[dict[str, Tensor]]):
        self.ctx: list[dict[str, Tensor]] = []
        for s in shards:
            off = s["offsets"].tolist()
            for i in range(len(off) - 1):
                a, b = off[i], off[i + 1]
                rec = {k: s[k][a:b] for k in ENTRY_KEYS if k in s}
                if "lexical" not in rec:  # a cache made before the lexical feature: "no match" everywhere
                    rec["lexical"] = torch.zeros(b - a, LEX_FEATURES, dtype=torch.float16)
                rec.update(tail=s["tail"][i], nll=s["nll"][i], t=s["t"][i], w_max=s["w_max"][i], doc=s["doc"][i])
                self.ctx.append(rec)

    @classmethod
    def load(cls, directory: str | Path) -> LabelSet:
        d = Path(directory)
        files = sorted(d.glob("shard_*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no label shards (shard_*.safetensors) in {str(d)!r}")
        return cls([load_file(str(f)) for f in files])

    def meta(self, directory: str | Path) -> dict:
        return json.loads((Path(directory) / META).read_text())

    def __len__(self) -> int:
        return len(self.ctx)

    def split(self, val_fraction: float) -> tuple[LabelSet, LabelSet]:
        """Hold out whole documents (by doc index parity of a hash) so validation never shares a document."""
        docs = sorted({int(c["doc"]) for c in self.ctx})
        n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
        val_docs = set(docs[::max(1, len(docs) // max(n_val, 1))][:n_val])
        tr, va = LabelSet([]), LabelSet([])
        for c in self.ctx:
            (va if int(c["doc"]) in val_docs else tr).ctx.append(c)
        return tr, va

    def collate(self, idx: list[int]) -> dict[str, Tensor]:
        """Pad contexts to the longest: entries [B, E, d] float32, masks/labels [B, E], tail [B, T]."""
        recs = [self.ctx[i] for i in idx]
        e = max(r["levels"].shape[0] for r in recs)
        out = {}
        fills = {"entries": 0.0, "levels": 0, "indices": 0, "ages": 0.0, "expandable": False, "collapsible": False,
                 "gain": float("nan"), "loss": float("nan"), "lexical": 0.0}
        for k, fill in fills.items():
            out[k] = torch.stack([torch.nn.functional.pad(r[k], (0, 0, 0, e - r[k].shape[0]) if r[k].dim() == 2
                                                          else (0, e - r[k].shape[0]), value=fill) for r in recs])
        out["entries"], out["lexical"] = out["entries"].float(), out["lexical"].float()
        out["mask"] = torch.stack([torch.arange(e) < r["levels"].shape[0] for r in recs])
        out["tail"] = torch.stack([r["tail"] for r in recs])
        return out
