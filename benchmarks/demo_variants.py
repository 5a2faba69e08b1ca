"""Demo variants: answer NLL of the planted facts under truncation vs MegaContext, for gist kind x position mode
x protected raw window, on the generated ship's log of ``megacontext demo``.

Prints a table and writes docs/results/demo_variants.{json,md}, each row tagged with the git commit and machine.

    python benchmarks/demo_variants.py [--chars 30000] [--out runs/demo_variants]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from megacontext.core.provenance import git_commit, machine
from megacontext.demo.run import DemoConfig, run_demo

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [(g, p, r) for g in ("none", "auto") for p in ("absolute", "compact") for r in (128, 256)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=30_000)
    ap.add_argument("--out", default="runs/demo_variants")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    commit = git_commit(REPO)
    rows = []
    for gist, mode, recent in VARIANTS:
        cfg = DemoConfig(out=f"{args.out}/{gist}-{mode}-{recent}", chars=args.chars, recent_raw=recent,
                         position_mode=mode, gistnet=gist, reference=False)
        rep = run_demo(cfg, say=lambda s: None)
        for f in rep["facts"]:
            rows.append({"gists": "gistnet-19m-v2" if gist == "auto" else "meanpool", "positions": mode,
                         "recent_raw": recent, "answer": f["answer"].strip(), **{k: round(v, 2)
                                                                                 for k, v in f["nll"].items()},
                         "recalled_lexical": f["recalled"]["megacontext+lexical"]})
    keys = ["gists", "positions", "recent_raw", "answer", "truncation", "megacontext+recency", "megacontext+lexical",
            "recalled_lexical"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = f"{machine(device)}, load avg {os.getloadavg()[0]:.1f}"
    res = REPO / "docs" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "demo_variants.json").write_text(json.dumps({"commit": commit, "machine": where, "chars": args.chars,
                                                        "w_max": 512, "rows": rows}, indent=1))
    (res / "demo_variants.md").write_text(
        f"# Demo variants: summed answer NLL (nats) of the planted facts, w_max = 512\n\n"
        f"Command: `python benchmarks/demo_variants.py --chars {args.chars}` at commit `{commit}` on {where}.\n"
        f"Lower is better; `recalled_lexical` = the greedy completion reproduced the answer.\n\n{table}\n")


if __name__ == "__main__":
    main()
