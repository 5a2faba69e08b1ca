"""Ship a GistNet training checkpoint as a bf16 copy (half the bytes; what ``megacontext/assets/models/`` holds).

    python benchmarks/gistnet_export.py RUN_DIR OUT_DIR [--base base-llama-19m]

Keeps the checkpoint's ``step``, ``train_config``, ``levels`` and ``lod1_weights_hash`` metadata; the stored
``weights_hash`` is that of the bf16 weights (what loading reproduces).
"""

from __future__ import annotations

import argparse

import torch

from megacontext.base import FrozenBase
from megacontext.core.checkpoint import read_checkpoint_meta
from megacontext.gistnet.model import GistNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--base", default="base-llama-19m")
    args = ap.parse_args()
    base = FrozenBase.load(args.base, device="cpu")
    meta = read_checkpoint_meta(args.src)
    net = GistNet.load(args.src, base)
    extra = {k: meta[k] for k in ("step", "train_config", "levels", "lod1_weights_hash") if k in meta}
    net.save(args.dst, base, extra=extra, dtype=torch.bfloat16)
    print(f"exported {args.src} -> {args.dst}: step {meta.get('step')}, {net.num_params()} params")


if __name__ == "__main__":
    main()
