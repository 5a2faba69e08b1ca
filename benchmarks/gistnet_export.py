"""Ship a GistNet training checkpoint as a bf16 copy (half the bytes; what ``megacontext/assets/models/`` holds).

    python benchmarks/gistnet_export.py RUN_DIR OUT_DIR [--base base-llama-19m-v2]

Keeps the checkpoint's ``step``, ``train_config``, ``levels`` and ``lod1_weights_hash`` metadata; the stored
``weights_hash`` is that of the bf16 weights (what loading reproduces).

Promotion guard (degenerate gists are a known failure of gisting): the exported net's LOD1 gists of 512
blocks (from ``--check-cache``, else random token blocks) must not collapse: their mean pairwise cosine
similarity must stay below ``--max-cos`` (default 0.98; mean-pooled gists of book blocks sit near 0.95 on the
v1 base), else the export is refused (``--force`` overrides).
The measured similarity is stored in the checkpoint metadata as ``gist_cos``.
"""

from __future__ import annotations

import argparse

import torch

from megacontext.base import FrozenBase
from megacontext.core.checkpoint import read_checkpoint_meta
from megacontext.core.lod import BLOCK
from megacontext.gistnet.model import GistNet
from megacontext.gistnet.objective import gist_similarity


def sample_blocks(base: FrozenBase, cache: str | None, n: int = 512) -> torch.Tensor:
    """[n, 32] token blocks: evenly spaced over a token cache, or seeded random ids without one."""
    if cache:
        from megacontext.data.token_cache import TokenCache

        toks = TokenCache.open(cache).tokens
        starts = torch.linspace(0, len(toks) - BLOCK - 1, n).long()
        return torch.stack([torch.from_numpy(toks[s:s + BLOCK].astype("int64")) for s in starts.tolist()])
    return torch.randint(0, base.vocab_size, (n, BLOCK), generator=torch.Generator().manual_seed(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--base", default="base-llama-19m-v2")
    ap.add_argument("--check-cache", default=None, help="token cache whose blocks feed the collapse check")
    ap.add_argument("--max-cos", type=float, default=0.98, help="refuse when mean gist cosine similarity exceeds it")
    ap.add_argument("--force", action="store_true", help="export even when the collapse check fails")
    args = ap.parse_args()
    base = FrozenBase.load(args.base, device="cpu")
    meta = read_checkpoint_meta(args.src)
    net = GistNet.load(args.src, base)
    with torch.no_grad():
        blocks = sample_blocks(base, args.check_cache)
        cos = float(gist_similarity(net(net.lod1_inputs(base, blocks), 1), max_rows=blocks.shape[0]))
    if cos > args.max_cos and not args.force:
        raise SystemExit(f"refusing to export {args.src}: its gists have collapsed (mean cosine {cos:.3f} > "
                         f"--max-cos {args.max_cos}); --force exports anyway")
    extra = {k: meta[k] for k in ("step", "train_config", "levels", "lod1_weights_hash") if k in meta}
    net.save(args.dst, base, extra={**extra, "gist_cos": round(cos, 4)}, dtype=torch.bfloat16)
    print(f"exported {args.src} -> {args.dst}: step {meta.get('step')}, {net.num_params()} params, gist cos {cos:.3f}")


if __name__ == "__main__":
    main()
