"""Where do crammed vectors live? Norms and directions of per-window optimised LOD1 vectors vs GistNet's gists.

    PYTHONPATH=. python benchmarks/cram_geometry.py --cache carry/g5/dev --windows 32 --steps 300 \
        --out docs/results/cram_geometry.json

GistNet's outputs are rescaled to the base model's mean embedding norm. If the crammed upper bound relies on
vectors far from that norm, the norm constraint caps what any GistNet can reach. For ``windows`` dev windows
(1024 context + 64 horizon, oldest 512 tokens gisted as 16 LOD1 vectors) this crams from the GistNet init and
reports: norms of gists and crammed vectors, cosine(crammed, gist), and the NLL on the 64 tokens after the span
(``near``) for raw / drop / gist / cram / cram rescaled to the embedding norm / gist scaled x2 and x4.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megacontext.base import FrozenBase
from megacontext.core.provenance import run_info
from megacontext.gistnet.eval.cramming import cram
from megacontext.gistnet.eval.substitution import window_nll
from megacontext.gistnet.model import GistNet
from megacontext.gistnet.objective import make_prefix
from megacontext.gistnet.windows import open_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="base-llama-19m-v2")
    ap.add_argument("--gistnet", default="gistnet-19m-v2")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--gisted", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = FrozenBase.load(args.base)
    net = GistNet.load(args.gistnet, base)
    wins = open_windows(args.cache, 1024, 64, split="all", seed=7, vocab_size=base.vocab_size)
    it = iter(wins.batches(args.batch))
    g = args.gisted // 32
    acc: dict[str, list[torch.Tensor]] = {}
    t0 = time.perf_counter()
    for _ in range(max(1, args.windows // args.batch)):
        toks = next(it).to(base.device)
        with torch.no_grad():
            gist, pos, rs = make_prefix(toks, base, net, g)  # [B, g, d]
        vecs, _, _ = cram(base, toks, rs, gist, pos, steps=args.steps, lr=args.lr)
        norm = vecs.norm(dim=-1, keepdim=True)
        variants = {"gist": gist, "cram": vecs, "cram_renorm": vecs * (base.embed_norm / norm),
                    "gist_x2": 2 * gist, "gist_x4": 4 * gist}
        with torch.no_grad():
            h = toks.shape[1] - rs - 1  # targets after the span's first raw token (drop cannot predict that one)
            rows = {"raw": window_nll(base, toks, h, 0)[:, :64],  # [B, 64] tokens right after the span
                    "drop": window_nll(base, toks, h, rs)[:, :64]}
            rows |= {k: window_nll(base, toks, h, rs, v, pos)[:, :64] for k, v in variants.items()}
        for k, v in rows.items():
            acc.setdefault(k, []).append(v.float().mean(-1).cpu())
        acc.setdefault("gist_norm", []).append(gist.norm(dim=-1).flatten().cpu())
        acc.setdefault("cram_norm", []).append(norm.flatten().cpu())
        acc.setdefault("cos_cram_gist", []).append(F.cosine_similarity(vecs, gist, dim=-1).flatten().cpu())
    res = {k: torch.cat(v) for k, v in acc.items()}
    nll = {k: float(res[k].mean()) for k in ("raw", "drop", "gist", "cram", "cram_renorm", "gist_x2", "gist_x4")}
    gap = nll["drop"] - nll["raw"]
    out = {
        "run": run_info(base.device),
        "seconds": time.perf_counter() - t0,
        "windows": int(res["raw"].shape[0]),
        "embed_norm": base.embed_norm,
        "norms": {k: {"mean": float(res[k].mean()), "p10": float(res[k].quantile(0.1)),
                      "p90": float(res[k].quantile(0.9))} for k in ("gist_norm", "cram_norm")},
        "cos_cram_gist": float(res["cos_cram_gist"].mean()),
        "near_nll": nll,
        "near_recovered": {k: (nll["drop"] - v) / gap for k, v in nll.items() if k not in ("raw", "drop")},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
