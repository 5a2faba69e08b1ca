"""Depth benchmark (issue 14): a history far past what LOD0-2 can tile, ingested through the API with the default
W_max, then reopened, scored and generated from. Reports the ingest cost per token against the history length
(it should stay flat: the tree appends, the working context stays within W_max whatever the depth), the levels
the tree and the working context reached, and peak memory (host RSS, GPU).

    # the GPU run (see docs/results/reliability.md for the exact command and what it needs)
    python benchmarks/depth.py --tokens 100000000 --device cuda --out docs/results/depth.json
    # a quick CPU check
    python benchmarks/depth.py --tokens 200000 --chunk 50000 --gistnet none --out /tmp/depth.json

Tokens are random ids of the base vocabulary (seeded; fast to make at any length, and the point is the
store and the working context, not the text) unless ``--books`` names a directory of ``*.txt.xz`` books.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megacontext.core.assets import BASE_MODEL

REPO = Path(__file__).resolve().parents[1]


def token_chunks(base, total: int, chunk: int, books: str | None, seed: int):
    """Yield int64 id tensors of ``chunk`` tokens until ``total`` (random ids, or book text cycled)."""
    if books:
        files = sorted(Path(books).glob("*.txt.xz"))
        if not files:
            raise FileNotFoundError(f"--books {books!r} holds no *.txt.xz files")
        ids: list[int] = []
        for f in files:
            with lzma.open(f, "rt", encoding="utf-8", errors="replace") as fh:
                ids += base.encode(fh.read())
            if len(ids) >= min(total, 50_000_000):
                break
        pool = torch.tensor(ids)
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < total:
        n = min(chunk, total - done)
        if books:
            start = done % max(pool.numel() - n, 1)
            yield pool[start:start + n]
        else:
            yield torch.randint(0, base.vocab_size, (n,), generator=g)
        done += n


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_now_mb() -> dict:
    """Current anonymous (heap, arrays) and file-backed (mapped level / index files: reclaimable) RSS, MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {f"{k.lower()}_mb": round(int(status[k].split()[0]) / 1024, 1) for k in ("RssAnon", "RssFile")
            if k in status}


def gpu_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def run(args) -> dict:
    from megacontext.api import MegaContext
    from megacontext.base import FrozenBase
    from megacontext.runtime.engine import EngineConfig
    from megacontext.runtime.fsck import check_store
    from megacontext.runtime.sampling import SamplingConfig
    from megacontext.wc import WorkingContextConfig

    base = FrozenBase.load(args.base, device=args.device, dtype=args.dtype)
    wc = WorkingContextConfig() if args.w_max is None else WorkingContextConfig(w_max=args.w_max,
                                                                                recent_raw=args.recent_raw)
    cfg = EngineConfig(wc=wc, k=min(EngineConfig().k, wc.recent_raw))
    store = Path(args.store or tempfile.mkdtemp(prefix="mc-depth-")) / "store"
    gistnet = None if args.gistnet == "none" else args.gistnet
    rows = []
    t_all = time.time()
    with MegaContext.create(store, base, gistnet=gistnet, config=cfg, durable=args.durable) as mc:
        for ids in token_chunks(base, args.tokens, args.chunk, args.books, args.seed):
            before = mc.num_tokens
            t0 = time.perf_counter()
            mc.ingest(ids)  # durable on return
            dt = time.perf_counter() - t0
            w = mc.engine.wc
            rows.append({"history": before, "tokens": ids.numel(), "seconds": round(dt, 3),
                         "us_per_token": round(1e6 * dt / ids.numel(), 3), "tree_levels": mc.tree.num_levels,
                         "wc_top_level": int(w.levels.max()) if len(w) else 0, "wc_entries": len(w),
                         "wc_cost": w.cost, "rss_mb": round(rss_mb(), 1), **rss_now_mb(),
                         "gpu_peak_mb": round(gpu_mb(), 1)})
            print(json.dumps(rows[-1]), flush=True)
        reach = mc.reach
    ingest_s = time.time() - t_all
    t0 = time.perf_counter()
    with MegaContext.open(store, base, durable=args.durable) as mc:
        reopen_s = time.perf_counter() - t0
        probe = next(token_chunks(base, args.probe, args.probe, args.books, args.seed + 1))
        t0 = time.perf_counter()
        nll = mc.score(probe).mean_nll
        score_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = list(mc.generate_ids(probe[:16], SamplingConfig(max_new_tokens=64)))
        gen_s = time.perf_counter() - t0
        final = {"num_tokens": mc.num_tokens, "tree_levels": mc.tree.num_levels,
                 "wc": repr(mc.engine.wc), "wc_top_level": int(mc.engine.wc.levels.max())}
    fsck = None
    if args.fsck:
        t0 = time.perf_counter()
        report = check_store(store)
        fsck = {"ok": report.ok, "problems": report.problems[:10], "seconds": round(time.perf_counter() - t0, 1)}
    sizes = {p.name: p.stat().st_size for p in store.iterdir() if p.is_file()}
    tail = rows[len(rows) // 10:] or rows  # skip warm-up
    first, last = tail[: max(len(tail) // 10, 1)], tail[-max(len(tail) // 10, 1):]
    mean = lambda rs: sum(r["us_per_token"] for r in rs) / len(rs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    result = {
        "command": "python benchmarks/depth.py " + " ".join(sys.argv[1:]), "commit": commit.stdout.strip(),
        "machine": f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "base": args.base, "gistnet": args.gistnet, "durable": args.durable, "w_max": cfg.wc.w_max,
        "recent_raw": cfg.wc.recent_raw,
        "reach_tokens": reach, "ingest_seconds": round(ingest_s, 1),
        "us_per_token_first_tenth": round(mean(first), 3), "us_per_token_last_tenth": round(mean(last), 3),
        "cost_ratio_last_vs_first": round(mean(last) / max(mean(first), 1e-9), 3),
        "peak_rss_mb": round(rss_mb(), 1), "peak_gpu_mb": round(gpu_mb(), 1),
        "reopen_seconds": round(reopen_s, 2),
        "score": {"tokens": args.probe, "mean_nll": round(nll, 4), "seconds": round(score_s, 2)},
        "generate_64": {"tokens": len(out), "seconds": round(gen_s, 2)}, "final": final, "fsck": fsck,
        "store_bytes": sizes, "bytes_per_token": round(sum(sizes.values()) / max(final["num_tokens"], 1), 3),
        "chunks": rows,
    }
    if not args.store and not args.keep:
        import shutil

        shutil.rmtree(store.parent, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--chunk", type=int, default=1_000_000, help="tokens per ingest() call (each ends with a flush)")
    p.add_argument("--base", default=BASE_MODEL, help="base model: an embedded name, a directory or a hub id")
    p.add_argument("--gistnet", default="auto", help="'auto' (the embedded GistNet for its base), 'none', or a path")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--w-max", type=int, default=None, help="default: WorkingContextConfig's (1024)")
    p.add_argument("--recent-raw", type=int, default=128)
    p.add_argument("--books", default=None, help="directory of *.txt.xz books (default: random ids)")
    p.add_argument("--store", default=None, help="where to build the store (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary store")
    p.add_argument("--fsck", action="store_true", help="run the full integrity check at the end")
    p.add_argument("--no-durable", dest="durable", action="store_false",
                   help="skip fsync (TreeConfig.durable=False): process kills stay safe, power loss does not")
    p.add_argument("--probe", type=int, default=2048, help="tokens scored after the reopen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "chunks"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
