"""Host memory of a store's lexical index against the history length (CPU, no base model).

Appends random ids (seeded, ``--vocab``) to a :class:`MegaContextTree` (mean-pool gists, ``--d`` wide, so the
level files stay small and the index dominates) in ``--chunk``-token steps, flushing after each as the API's
``ingest`` does, and records after every step the process's *anonymous* resident memory (``RssAnon``: heap,
arrays; what a history cannot give back), its file-backed resident memory (``RssFile``: mapped level and
segment files, page cache the kernel can drop), the peak (``VmHWM``), the index's segment count and the
postings it holds in RAM. Then reopens the store, times queries and ``fsck`` of ``lex/``.

    python benchmarks/lexical_rss.py --tokens 20000000 --chunk 1000000 --out docs/results/lexical_rss.json

Runs against whichever checkout holds it (``sys.path`` is set to its root), so the same file measures an
older commit when copied into that commit's worktree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package

from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig  # noqa: E402


def proc_mem() -> dict:
    """RssAnon, RssFile, VmRSS, VmHWM of this process in MiB (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def ram_postings(idx) -> int:
    """Postings held in process memory (not in a mapped file)."""
    return sum(s.num_postings for s in idx.segments if not isinstance(s.blocks, np.memmap))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--chunk", type=int, default=1_000_000)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--durable", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    comp = MeanPoolCompressor(torch.randn(args.vocab, args.d, generator=torch.Generator().manual_seed(0)))
    tmp = Path(tempfile.mkdtemp(prefix="mc-lexrss-"))
    store, rng, rows = tmp / "store", np.random.default_rng(0), []
    cfg = TreeConfig(durable=args.durable, commit_tokens=1 << 62, commit_seconds=1e9)
    start = proc_mem()
    try:
        t_all = time.perf_counter()
        with MegaContextTree.create(store, args.d, "lexrss", comp, vocab_size=args.vocab, config=cfg) as tree:
            done = 0
            while done < args.tokens:
                n = min(args.chunk, args.tokens - done)
                t0 = time.perf_counter()
                tree.append(rng.integers(0, args.vocab, n, dtype=np.int64))
                tree.flush()
                done += n
                lex = tree.lexical
                rows.append({"tokens": done, "seconds": round(time.perf_counter() - t0, 3), **proc_mem(),
                             "segments": len(lex.segments), "postings": lex.num_postings,
                             "ram_postings": ram_postings(lex), "lex_mb": round(dir_bytes(store / "lex") / 2**20, 1)})
                print(json.dumps(rows[-1]), flush=True)
        ingest_s = time.perf_counter() - t_all
        t0 = time.perf_counter()
        with MegaContextTree.open(store, comp, readonly=True) as tree:
            reopen_s = time.perf_counter() - t0
            tok = tree.tokens(0, min(args.tokens, 1 << 20)).numpy()
            t0 = time.perf_counter()
            for p in rng.integers(0, tok.size - 64, args.queries):
                tree.lexical.scores(tok[p:p + 64])
            query_ms = 1e3 * (time.perf_counter() - t0) / args.queries
            from megacontext.tree.lexical_store import check_lexical
            t0 = time.perf_counter()
            problems = check_lexical(store, tree._files[0].read, tree._files[0].count)[0]
            fsck_s = time.perf_counter() - t0
            after_open = proc_mem()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    result = {"command": "python benchmarks/lexical_rss.py " + " ".join(sys.argv[1:]),
              "commit": commit.stdout.strip(), "machine": f"CPU, {os.cpu_count()} cores ({platform.machine()})",
              "numpy": np.__version__, "start": start, "rows": rows, "ingest_s": round(ingest_s, 1),
              "reopen_s": round(reopen_s, 3), "query_ms": round(query_ms, 2), "fsck_lex_s": round(fsck_s, 1),
              "fsck_problems": problems, "after_reopen_query_fsck": after_open}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
