"""Summarise GistNet training metrics (JSONL from ``megacontext train gistnet``): a table of the validation
rows and a PNG of the curves.

    python benchmarks/gistnet_training_report.py docs/results/gistnet_training_stage1.jsonl \
        docs/results/gistnet_training_stage2.jsonl --png docs/results/gistnet_training.png

Later files continue earlier ones (their steps are offset by the previous file's last step), so a run
resumed from an exported checkpoint plots as one curve. With ``--compare`` every file is its own run
(variants trained side by side, e.g. by ``benchmarks/gistnet_variants.sh``): one table column and one curve
per file, named by the file stem.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    rows: list[dict] = []
    offset = 0
    for p in paths:
        part = [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
        for r in part:
            rows.append({**r, "step": r["step"] + offset, "file": Path(p).name})
        offset = rows[-1]["step"] if rows else offset
    return rows


def table(rows: list[dict]) -> str:
    cols = ["step", "val_raw_near", "val_drop_near", "val_gist_near", "val_recovered_near", "val_raw_horizon",
            "val_drop_horizon", "val_gist_horizon", "val_recovered_horizon"]
    out = ["| " + " | ".join(c.removeprefix("val_") for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "val_recovered_near" in r:
            out.append("| " + " | ".join(str(r[c]) if c == "step" else f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tr = [r for r in rows if "dense_kl" in r]
    a.plot([r["step"] for r in tr], [r["dense_kl"] for r in tr], label="train dense KL (256 tokens after gists)")
    a.set_xlabel("step")
    a.set_ylabel("nats/token")
    a.legend()
    va = [r for r in rows if "val_recovered_near" in r]
    for key, lab in (("val_recovered_near", "near (64 tokens after span)"), ("val_recovered_horizon", "horizon")):
        b.plot([r["step"] for r in va], [r[key] for r in va], marker="o", label=lab)
    b.axhline(0.8, ls="--", c="gray", lw=0.8, label="target 0.8")
    b.axhline(0.0, c="k", lw=0.5)
    b.set_ylim(-0.3, 1.0)
    b.set_xlabel("step")
    b.set_ylabel("gap recovered (dev books, 512 of 1024 gisted)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare(paths: list[str], png: str | None) -> None:
    """Validation gap recovered (near / horizon) per run and step; runs are files, named by their stem."""
    runs = {Path(p).stem.removeprefix("metrics_"): [json.loads(x) for x in Path(p).read_text().splitlines()
                                                    if x.strip()] for p in paths}
    val = {name: {r["step"]: r for r in rows if "val_recovered_near" in r} for name, rows in runs.items()}
    steps = sorted({s for v in val.values() for s in v})
    print("near / horizon gap recovered on the validation batches")
    print("| step | " + " | ".join(val) + " |")
    print("|" + "---|" * (len(val) + 1))
    for s in steps:
        cells = [f"{v[s]['val_recovered_near']:.3f} / {v[s]['val_recovered_horizon']:.3f}" if s in v else ""
                 for v in val.values()]
        print(f"| {s} | " + " | ".join(cells) + " |")
    for name, rows in runs.items():
        last = rows[-1] if rows else {}
        print(f"{name}: {last.get('step')} steps in {last.get('elapsed_s')} s")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, v in val.items():
            xs = sorted(v)
            ax.plot(xs, [v[x]["val_recovered_near"] for x in xs], marker="o", label=name)
        ax.axhline(0.8, ls="--", c="gray", lw=0.8, label="target 0.8")
        ax.axhline(0.0, c="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("gap recovered, near (validation)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--png", default=None)
    ap.add_argument("--compare", action="store_true", help="each file is a separate run (side-by-side variants)")
    args = ap.parse_args()
    if args.compare:
        compare(args.jsonl, args.png)
        return
    rows = load(args.jsonl)
    print(table(rows))
    if args.png:
        plot(rows, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
