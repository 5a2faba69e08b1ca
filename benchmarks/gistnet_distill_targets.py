"""Make per-block distillation targets for GistNet (megacontext.gistnet.distill) on the GPU.

    python benchmarks/gistnet_distill_targets.py --cache TOKEN_CACHE --out runs/distill \\
        [--base base-llama-19m-v2] [--gistnet gistnet-19m-v2] [--blocks 200000] [--steps 300]

Blocks are drawn evenly from the cache's train split (seeded); each target starts from the given GistNet's
gist (mean pooling with --gistnet none) and is optimised for the block's own reconstruction. On one H200 the
reconstruction probe optimised 64 blocks x 300 steps in a few seconds; budget ~1 minute per 20k blocks
(an estimate to be measured). Then train with
``train gistnet ... --distill runs/distill --objective.distill-weight 1.0``.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from megacontext.base import FrozenBase
from megacontext.core.assets import BASE_MODEL, GISTNET_MODEL
from megacontext.core.lod import BLOCK
from megacontext.data.token_cache import TokenCache
from megacontext.gistnet.distill import make_targets
from megacontext.tree.compressor import MeanPoolCompressor


def sample_blocks(cache: TokenCache, n: int, seed: int) -> torch.Tensor:
    """n block-aligned 32-token blocks from whole documents of the cache, seeded: [n, 32] int64."""
    rng = np.random.default_rng(seed)
    lengths = cache.doc_lengths // BLOCK  # whole blocks per document
    docs = rng.choice(len(lengths), size=n, p=lengths / lengths.sum())
    within = (rng.random(n) * lengths[docs]).astype(np.int64)
    starts = cache.doc_starts[docs] + within * BLOCK
    return torch.from_numpy(np.stack([cache.tokens[s:s + BLOCK].astype(np.int64) for s in starts]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="token cache (data prepare) the blocks come from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default=BASE_MODEL)
    ap.add_argument("--gistnet", default=GISTNET_MODEL, help="starting vectors: a GistNet checkpoint, or 'none'")
    ap.add_argument("--blocks", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    base = FrozenBase.load(args.base, device=args.device)
    if args.gistnet == "none":
        mp = MeanPoolCompressor.from_base(base)

        def init(b):
            return mp.compress(base.embed(b), 1)
    else:
        from megacontext.gistnet.levels import TwoLevelGist

        net = TwoLevelGist.load(args.gistnet, base)

        def init(b):
            return net(net.lod1_inputs(base, b), 1)
    blocks = sample_blocks(TokenCache.open(args.cache), args.blocks, args.seed)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=base.device.type == "cuda"):
        out = make_targets(base, blocks, args.out, init, args.steps, args.lr, args.batch)
    print(f"wrote {args.blocks} targets to {out}")


if __name__ == "__main__":
    main()
