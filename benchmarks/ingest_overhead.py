"""API ingest throughput with mean-pooled gists (no GistNet): what the engine and the store cost per token.

    OMP_NUM_THREADS=1 python benchmarks/ingest_overhead.py [--tokens 1000000] [--device cpu]

Ingests seeded random ids into a fresh non-durable store with the recency and the learned focus (lazy
ingest: neither runs focus rounds) and prints tokens/s and where the time went (cProfile, top functions).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from megacontext.api import MegaContext
from megacontext.core.assets import LENSNET_MODEL, resolve
from megacontext.core.provenance import git_commit, machine
from megacontext.runtime.engine import EngineConfig
from megacontext.wc.working_context import WorkingContextConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--w-max", type=int, default=2048)
    args = ap.parse_args()
    ids = torch.randint(5, 16000, (args.tokens,), generator=torch.Generator().manual_seed(0))
    print(f"commit {git_commit(Path(__file__).resolve().parents[1])}; {machine(torch.device(args.device))}")
    for focus in ("recency", "lensnet"):
        cfg = EngineConfig(wc=WorkingContextConfig(w_max=args.w_max, recent_raw=128), focus=focus)
        with tempfile.TemporaryDirectory() as d:
            mc = MegaContext.create(Path(d) / "m", config=cfg, gistnet=None, durable=False, device=args.device,
                                    lensnet=resolve(LENSNET_MODEL) if focus == "lensnet" else None)
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            mc.ingest(ids)
            prof.disable()
            dt = time.perf_counter() - t0
            print(f"{focus}: {args.tokens / dt:,.0f} tokens/s ({args.tokens:,} tokens, mean-pooled gists); "
                  f"{mc.engine.wc}")
            mc.close()
        pstats.Stats(prof).sort_stats("tottime").print_stats(6)


if __name__ == "__main__":
    main()
