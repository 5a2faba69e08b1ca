"""Lexical index speed on real text (CPU): index the staged books in 8,192-block batches, then BM25 queries
of 64-token windows of the same text.

    python benchmarks/lexical_index.py --books carry/focus_v2/books.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from megacontext.tree.lexical import LexicalIndex  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--books", default="carry/focus_v2/books.safetensors")
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    tok = load_file(args.books)["tokens"].long().numpy()
    n = tok.size // 32 * 32
    blocks = tok[:n].reshape(-1, 32)
    idx = LexicalIndex()
    t0 = time.perf_counter()
    for a in range(0, blocks.shape[0], 8192):
        idx.add(a, blocks[a:a + 8192])
    t_add = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    matches, t0 = [], time.perf_counter()
    for p in rng.integers(0, n - 64, args.queries):
        matches.append(idx.scores(tok[p:p + 64])[0].size)
    t_q = (time.perf_counter() - t0) / args.queries
    print(json.dumps({"tokens": int(n), "blocks": int(blocks.shape[0]), "postings": idx.num_postings,
                      "segments": len(idx.segments), "index_mtok_per_s": round(n / t_add / 1e6, 2),
                      "query_ms": round(t_q * 1e3, 2), "matched_blocks_per_query": int(np.mean(matches))}))


if __name__ == "__main__":
    main()
