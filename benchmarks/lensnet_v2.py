"""Focus v2 on one GPU: far-context labels -> LensNet with the lexical feature -> held-out evaluation.

Needs ``carry/focus_v2`` (``python benchmarks/lensnet_v2_stage.py``: ~19 MiB of token ids of train_03
books and the QMSum train split). Steps, each time-boxed so the whole run fits ``--budget`` seconds:
1. items: far-context histories (:mod:`megacontext.lensnet.far_data`: planted repeats, key/value facts
   asked later, QMSum queries with their evidence), split by source book / meeting into training and
   held-out items;
2. labels: :func:`megacontext.lensnet.far_labels.generate_far_labels` for ``--label-seconds`` (utilities
   averaged over two phrasings per item, evidence entries always labelled);
3. training: LensNet with ``lexical_features=3`` (up to ``--train-steps``, stopped at ``--train-seconds``;
   held-out Spearman / sign agreement
   on the label cache's held-out sources), and the shipped LensNet (no lexical feature) scored on the
   same held-out labels for comparison;
4. end to end on held-out items: recency, the shipped LensNet, the new LensNet, the lexical policy and
   the evidence oracle at W_max 1024 and 2048 (answer NLL, gap closed with 95% intervals, evidence held raw),
   per kind and overall.
Writes ``<out>/summary.json`` (and the checkpoint ``<out>/lensnet/final``, the labels under ``<out>/labels``).

    python benchmarks/lensnet_v2.py --carry carry/focus_v2 --out runs/lensnet_v2
    python benchmarks/lensnet_v2.py --smoke   # CPU code-path check, minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import lzma
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from megacontext.core.assets import BASE_MODEL, GISTNET_MODEL, LENSNET_MODEL  # noqa: E402
from megacontext.lensnet.far_data import FarConfig, make_items  # noqa: E402
from megacontext.lensnet.far_labels import FarLabelConfig, generate_far_labels  # noqa: E402

log = logging.getLogger("lensnet_v2")


def _docs(path: Path) -> list[torch.Tensor]:
    d = load(lzma.decompress(path.read_bytes()))
    tok, off = d["tokens"].long(), d["offsets"].tolist()
    return [tok[a:b] for a, b in zip(off[:-1], off[1:], strict=True)]


def load_data(carry: Path, held_every: int) -> tuple[tuple, tuple]:
    """((train books, train meetings), (held-out books, held-out meetings)); every held_every-th source out."""
    books = _docs(carry / "books.safetensors.xz")
    index = json.loads((carry / "qmsum.json").read_text())
    meetings = [{"id": i, "ids": ids, "queries": [{**q, "spans": [tuple(s) for s in q["spans"]]}
                                                 for q in index[i]["queries"]]}
                for i, ids in enumerate(_docs(carry / "qmsum.safetensors.xz"))]
    split = lambda xs: ([x for i, x in enumerate(xs) if i % held_every], xs[::held_every])  # noqa: E731
    (tb, hb), (tm, hm) = split(books), split(meetings)
    return (tb, tm), (hb, hm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--carry", default="carry/focus_v2")
    ap.add_argument("--out", default="runs/lensnet_v2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-items", type=int, default=6000, help="items made (labelling stops at the time box)")
    ap.add_argument("--eval-items", type=int, default=48, help="held-out items per kind")
    ap.add_argument("--label-seconds", type=float, default=300.0)
    ap.add_argument("--train-steps", type=int, default=6000, help="at most; training also stops at --train-seconds")
    ap.add_argument("--train-seconds", type=float, default=120.0)
    ap.add_argument("--batch-size", type=int, default=256, help="variants per base forward while labelling")
    ap.add_argument("--rounds", type=int, default=4, help="refocus rounds per evaluated question")
    ap.add_argument("--phrasings", type=int, default=2, help="variants averaged per label (1 = fastest)")
    ap.add_argument("--max-labels", type=int, default=12, help="labelled entries per context")
    ap.add_argument("--contexts-per-item", type=int, default=4)
    ap.add_argument("--held-every", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: check the code path on CPU")
    ap.add_argument("--eval-only", action="store_true",
                    help="no labels, no training: recency / shipped LensNet / lexical / oracle on held-out items")
    ap.add_argument("--max-history", type=int, default=16384)
    ap.add_argument("--export", default="", help="copy summary, metrics and the final checkpoint here (e.g. $OUT)")
    ap.add_argument("--commit", default="", help="the code commit to record (the device copy's git may be stale)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.smoke:
        args.train_items, args.eval_items, args.label_seconds, args.train_steps = 6, 2, 60.0, 20
        args.train_seconds = 30.0
        args.batch_size = 16
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from megacontext.focus import LexicalFocus
    from megacontext.focus.lens import LensPolicy
    from megacontext.lensnet.labels import LabelSet
    from megacontext.lensnet.model import LensNet, LensNetConfig
    from megacontext.lensnet.runs import load_models
    from megacontext.lensnet.train import LensTrainConfig, evaluate, train_lensnet

    base, comp, version = load_models(BASE_MODEL, GISTNET_MODEL, args.device, "float32")
    (tb, tm), (hb, hm) = load_data(Path(args.carry), args.held_every)
    fcfg = FarConfig(max_history=4096 if args.smoke else args.max_history, phrasings=args.phrasings)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary: dict = {"commit": args.commit or _commit(), "device": device, "argv": vars(args),
                     "far_config": fcfg.to_dict()}
    budgets = (1024,) if args.smoke else (1024, 2048)
    old_net, old_meta = LensNet.load(LENSNET_MODEL, base)
    policies = {"lensnet_shipped": LensPolicy(old_net, base), "lexical": LexicalFocus()}
    held = make_items(3 * args.eval_items, hb, hm, base.encode, fcfg, seed=1)
    if args.eval_only:
        return _evaluate(summary, base, comp, held, policies, budgets, args, out, t0)
    items = make_items(args.train_items, tb, tm, base.encode, fcfg, seed=0)

    lcfg = FarLabelConfig(seconds=args.label_seconds, batch_size=args.batch_size, data=fcfg,
                          max_labels=args.max_labels, contexts_per_item=args.contexts_per_item,
                          budgets=(1024,) if args.smoke else (1024, 2048))
    summary["labels"] = generate_far_labels(base, comp, items, lcfg, out / "labels", version)
    summary["seconds_labels"] = round(time.perf_counter() - t0, 1)

    tcfg = LensTrainConfig(labels=str(out / "labels"), out=str(out / "lensnet"), steps=args.train_steps,
                           batch_size=32, lr=1e-3, warmup=min(100, args.train_steps // 10), val_fraction=0.1,
                           eval_every=max(args.train_steps // 4, 1), save_every=args.train_steps,
                           max_seconds=args.train_seconds,
                           model=LensNetConfig(lexical_features=3))
    summary["train"] = train_lensnet(base, tcfg)
    summary["seconds_train"] = round(time.perf_counter() - t0, 1)
    new_net, new_meta = LensNet.load(out / "lensnet" / "final", base)
    _, val = LabelSet.load(out / "labels").split(tcfg.val_fraction)
    summary["ranking"] = {"val_contexts": len(val)}
    if len(val):  # held-out sources of the label cache (none in a one-source smoke run)
        summary["ranking"].update(
            lensnet_v2_lexical=evaluate(new_net, base, val, new_meta["target_scale"], tcfg.loss),
            lensnet_shipped=evaluate(old_net, base, val, old_meta["target_scale"], tcfg.loss))

    policies["lensnet_v2_lexical"] = LensPolicy(new_net, base)
    _evaluate(summary, base, comp, held, policies, budgets, args, out, t0)


def _evaluate(summary, base, comp, held, policies, budgets, args, out, t0) -> None:
    from megacontext.focus.far_eval import far_rows, summarise

    rows = far_rows(base, comp, held, policies, budgets, args.rounds)
    summary["end_to_end"] = {"all": summarise(rows, budgets)}
    for kind in sorted({r["kind"] for r in rows}):
        summary["end_to_end"][kind] = summarise([r for r in rows if r["kind"] == kind], budgets)
    summary["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.export:  # what is worth bringing back: small files only (the labels stay behind)
        exp = Path(args.export)
        exp.mkdir(parents=True, exist_ok=True)
        for src in [out / "summary.json", out / "labels" / "meta.json", out / "lensnet" / "metrics.jsonl",
                    out / "lensnet" / "final" / "model.safetensors", out / "lensnet" / "final" / "config.json"]:
            if src.is_file():
                shutil.copy(src, exp / (src.parent.name + "_" + src.name if src.parent != out else src.name))
    print(json.dumps({k: summary.get(k) for k in ("labels", "ranking", "seconds_total")}, indent=1))
    for kind, res in summary["end_to_end"].items():
        for b in budgets:
            r = res[str(b)]
            print(kind, b, r["items"], {p: (round(r[p]["nll"]["value"], 4), r[p].get("gap_closed", {}).get("value"),
                                            round(r[p]["evidence_raw"], 3)) for p in r if p != "items"})


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
