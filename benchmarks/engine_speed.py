"""Engine speed on the embedded 19M model: streaming score throughput and generation with / without KV-cache reuse.

Prints a table and writes docs/results/engine_speed.{json,md} tagged with the git commit and machine.

    python benchmarks/engine_speed.py [--history-chars 30000] [--new-tokens 64] [--score-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from megacontext.api import MegaContext
from megacontext.base import FrozenBase
from megacontext.core.provenance import git_commit, machine
from megacontext.demo.input import ships_log
from megacontext.runtime.engine import EngineConfig
from megacontext.runtime.sampling import SamplingConfig
from megacontext.wc.working_context import WorkingContextConfig

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history-chars", type=int, default=30_000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--score-tokens", type=int, default=1024)
    ap.add_argument("--w-max", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = FrozenBase.load(str(REPO / "models" / "base-llama-19m"))
    text, facts = ships_log(args.history_chars + 8 * args.score_tokens, seed=1)
    ids = base.encode(text)
    hist, tail = ids[: len(ids) - args.score_tokens], ids[len(ids) - args.score_tokens:]
    rows = []
    for reuse in (True, False):
        cfg = EngineConfig(wc=WorkingContextConfig(w_max=args.w_max, recent_raw=256, position_mode="compact"),
                           focus="lexical", cache_reuse=reuse)
        with tempfile.TemporaryDirectory() as d, MegaContext.create(Path(d) / "m", base, config=cfg,
                                                                    durable=False) as mc:
            t0 = time.perf_counter()
            mc.ingest(hist)
            t_ingest = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = mc.score(tail)
            t_score = time.perf_counter() - t0
            mc.engine.timer.drain()
            prompt = base.encode("\n" + facts[0].question)
            t0 = time.perf_counter()
            out = list(mc.generate_ids(prompt, SamplingConfig(max_new_tokens=args.new_tokens)))
            t_gen = time.perf_counter() - t0
            stats = dict(mc.engine.read_stats)
        rows.append({"cache_reuse": reuse, "history_tokens": len(hist), "ingest_tok_per_s": round(len(hist) / t_ingest),
                     "score_tokens": len(tail), "score_tok_per_s": round(len(tail) / t_score, 1),
                     "score_mean_nll": round(res.mean_nll, 4), "generated": len(out),
                     "generate_tok_per_s": round(len(out) / t_gen, 2), "slots_read": stats["slots_read"],
                     "slots_reused": stats["slots_reused"], "tokens": out})
    same = rows[0]["tokens"] == rows[1]["tokens"]
    keys = ["cache_reuse", "history_tokens", "ingest_tok_per_s", "score_tok_per_s", "score_mean_nll",
            "generate_tok_per_s", "slots_read", "slots_reused"]
    table = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                      + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])
    print(table)
    print(f"identical generated tokens with and without reuse: {same}")
    commit = git_commit(REPO)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = f"{machine(device)}, load avg {os.getloadavg()[0]:.1f}"
    res_dir = REPO / "docs" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "engine_speed.json").write_text(json.dumps({"commit": commit, "machine": where, "w_max": args.w_max,
                                                           "identical_tokens": same, "rows": rows}, indent=1))
    (res_dir / "engine_speed.md").write_text(
        f"# Engine speed (base-llama-19m, w_max = {args.w_max}, compact positions, lexical focus)\n\n"
        f"Command: `python benchmarks/engine_speed.py` at commit `{commit}` on {where}.\n"
        f"Ingest = append + WC sync + refocus (no base reads); score = one base forward per 32-token chunk;\n"
        f"generate = {args.new_tokens} greedy tokens after a prompt. Identical tokens with and without reuse: "
        f"{same}.\n\n{table}\n")


if __name__ == "__main__":
    main()
