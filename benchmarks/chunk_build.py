"""Per-chunk cost of building MegaContext bench inputs (WC from the prefix + policy rounds + materialise).

The perplexity tasks build one working context per scored chunk, so this cost, times the number of chunks,
sizes a GPU run (see benchmarks/run_suite.sh, part ppl_mc). For each system and budget it builds the last
``--chunks`` chunks of a ``--history``-token dev book in waves (megacontext.bench.chunk_contexts) and
reports milliseconds per chunk: the whole build, the part spent inside the LensNet network (compute-bound
on a CPU, launch-bound on a GPU, batched per wave) and the rest (Python + allocator + materialise), next to
the engine path that the bench used before (one Engine per chunk, one LensNet call per round). Forwards
of the base model are not part of it. Best of ``--repeats`` (the CPU may be shared).

    python benchmarks/chunk_build.py [--history 32768] [--chunk 128] [--chunks 64] [--w-max 1024 2048]

Writes docs/results/chunk_build.{json,md} tagged with command, commit and machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from megacontext.base import FrozenBase
from megacontext.bench import corpora
from megacontext.bench.chunk_contexts import ChunkBuild, PrefixHistory, build_wave
from megacontext.bench.registry import build_system
from megacontext.bench.scoring import chunk_bounds
from megacontext.bench.system import Sample
from megacontext.core.assets import BASE_MODEL
from megacontext.core.lod import BLOCK
from megacontext.core.provenance import run_info
from megacontext.focus import RecencyFocus
from megacontext.runtime.engine import Engine, EngineConfig
from megacontext.wc.working_context import WorkingContextConfig

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("megacontext-recency", "meanpool-recency", "megacontext-lensnet", "megacontext-lexical")


class _NetClock:
    """Wraps a LensNet so the time spent inside its forward is measured (synchronised on CUDA)."""

    def __init__(self, net):
        self.net, self.seconds, self.calls = net, 0.0, 0

    def __call__(self, *args, **kw):
        t0 = time.perf_counter()
        out = self.net(*args, **kw)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _engine_path(system, sample, history, bounds, w_max) -> None:
    """The pre-batching build: an Engine over each prefix, focus_on, materialize."""
    cfg = system.cfg
    for s, e in bounds:
        wc = WorkingContextConfig(w_max=w_max - (e - s), recent_raw=cfg.recent_raw, position_mode=cfg.position_mode)
        policy = system.make_policy()
        engine = Engine(system.base, PrefixHistory(history, s), EngineConfig(wc=wc, k=BLOCK),
                        policy=getattr(policy, "policy", policy))
        if cfg.rounds and not isinstance(engine.policy, RecencyFocus):
            engine.focus_on(sample.tokens[max(s - cfg.query_tokens, 0):s], rounds=cfg.rounds)
        engine.materialize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=BASE_MODEL, help="base model: an embedded name, a directory or a hub id")
    ap.add_argument("--books", default=str(REPO.parent / "shared" / "data" / "books" / "dev"))
    ap.add_argument("--history", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--w-max", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engine-chunks", type=int, default=16, help="chunks timed on the old engine path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared CPU)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "chunk_build"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    base = FrozenBase.load(args.base, device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    doc = corpora.load_books(args.books, base.encode, 1, args.history)[0]
    sample = Sample(doc.doc_id, doc.tokens[:args.history], 1, int(doc.tokens[:args.history].shape[0]))
    bounds = chunk_bounds(sample.target_start, sample.target_end, args.chunk)[-args.chunks:]
    rows = []
    for name in args.systems:
        system = build_system(name, base, {"chunk": args.chunk, "wave": args.chunks})
        history = system._histories([sample])[0]
        policy = system.make_policy()
        clock = None
        if hasattr(policy, "policy"):  # BatchedLens: time its network
            clock = _NetClock(policy.policy.net)
            policy.policy.net = clock
        cfg = system.cfg
        build = ChunkBuild(cfg.recent_raw, cfg.position_mode, cfg.rounds, cfg.query_tokens)
        for w in args.w_max:
            best, net_best = float("inf"), 0.0
            for _ in range(args.repeats):
                if clock:
                    clock.seconds = 0.0
                t0 = time.perf_counter()
                jobs = build_wave(base, history, sample, 0, bounds, w, build, system.make_policy, system.fresh_policy)
                dt = time.perf_counter() - t0
                if dt < best:
                    best, net_best = dt, clock.seconds if clock else 0.0
            few = bounds[-args.engine_chunks:]
            eng = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _engine_path(system, sample, history, few, w)
                eng = min(eng, time.perf_counter() - t0)
            n = len(bounds)
            row = {"system": name, "w_max": w, "chunks": n, "mean_read": sum(j.length for j in jobs) / n,
                   "build_ms": 1e3 * best / n, "lensnet_ms": 1e3 * net_best / n,
                   "rest_ms": 1e3 * (best - net_best) / n, "engine_path_ms": 1e3 * eng / len(few)}
            rows.append(row)
            print(f"{name:22s} W={w:5d}  build {row['build_ms']:7.1f} ms/chunk  (LensNet {row['lensnet_ms']:6.1f}, "
                  f"rest {row['rest_ms']:6.1f})  engine path {row['engine_path_ms']:7.1f} ms/chunk  "
                  f"read {row['mean_read']:.0f} slots")
    meta = {**run_info(base.device), "history_tokens": int(sample.tokens.shape[0]), "chunk": args.chunk,
            "doc": doc.doc_id, "torch_threads": args.threads}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Chunk-context build cost ({meta['machine']})", "",
             f"Command: `{meta['command']}` · commit `{meta['commit']}` · {meta['date']} · history "
             f"{meta['history_tokens']} tokens of `{doc.doc_id}`, chunk {args.chunk}, the last {len(bounds)} chunks, "
             f"{args.threads} torch thread(s).",
             "", "ms per chunk; best of repeats. `engine path` = one Engine per chunk (the bench before batching).",
             "", "| system | W_max | build | in LensNet | rest | engine path | mean read (slots) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['system']} | {r['w_max']} | {r['build_ms']:.1f} | {r['lensnet_ms']:.1f} | {r['rest_ms']:.1f} | "
              f"{r['engine_path_ms']:.1f} | {r['mean_read']:.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md"))


if __name__ == "__main__":
    main()
