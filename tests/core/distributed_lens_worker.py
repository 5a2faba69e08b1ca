"""LensNet worker for tests/test_distributed.py, launched with torchrun's environment (gloo, CPU) or as one process.

Usage: ``distributed_lens_worker.py MODEL_DIR LABEL_DIR OUT_DIR ROWS_PER_RANK STEPS``. Runs the real LensNet
trainer (:func:`megacontext.lensnet.train.train_lensnet`) unmodified; under torchrun it joins the group and
each rank trains on its slice of the global batch. :func:`make_labels` writes the synthetic label cache the
test trains on: contexts of different lengths (so ranks pad differently) and different numbers of labelled
entries (so a per-rank mean would differ from the global mean).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from megacontext.core import distributed as D


def make_labels(path: Path, d_model: int, fingerprint: str, n_ctx: int = 16, seed: int = 0) -> None:
    from megacontext.lensnet.labels import META

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 15, (n_ctx,), generator=g)  # entries per context
    n = int(lengths.sum())
    ent = torch.randn(n, d_model, generator=g)
    lv = torch.randint(0, 3, (n,), generator=g)
    sig = ent[:, 0] + 0.1 * torch.randn(n, generator=g)  # utility planted in the first coordinate
    unlabelled = torch.rand(n, generator=g) < 0.3
    nan = torch.tensor(float("nan"))
    gain = torch.where((lv > 0) & ~unlabelled, sig, nan)
    loss = torch.where((lv == 0) & ~unlabelled, sig, nan)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    shard = {"entries": ent.half(), "levels": lv, "indices": torch.arange(n), "ages": torch.rand(n, generator=g),
             "expandable": lv > 0, "collapsible": lv == 0, "gain": gain, "loss": loss, "offsets": offsets,
             "tail": torch.randint(0, 100, (n_ctx, 8), generator=g), "nll": torch.zeros(n_ctx),
             "t": torch.zeros(n_ctx, dtype=torch.long), "w_max": torch.zeros(n_ctx, dtype=torch.long),
             "doc": torch.arange(n_ctx) % 4}
    path.mkdir(parents=True, exist_ok=True)
    save_file(shard, str(path / "shard_00000.safetensors"))
    (path / META).write_text(json.dumps({"base_fingerprint": fingerprint, "config": {}, "compressor": "synthetic"}))


def train_config(label_dir: str, out_dir: str, rows: int, steps: int):
    from megacontext.lensnet.model import LensNetConfig
    from megacontext.lensnet.train import LensTrainConfig

    return LensTrainConfig(labels=label_dir, out=out_dir, steps=steps, batch_size=rows, lr=1e-2, warmup=0,
                           eval_every=steps, save_every=steps, val_fraction=0.25,
                           model=LensNetConfig(width_mult=1.0, layers=1, tail_tokens=8))


def main(model_dir: str, label_dir: str, out_dir: str, rows: int, steps: int) -> dict:
    from megacontext.base import FrozenBase
    from megacontext.lensnet.train import train_lensnet

    info = D.init_distributed("cpu")
    D.quiet_non_main_ranks(info)
    torch.set_num_threads(1)
    base = FrozenBase.load(model_dir, device="cpu", dtype="float32")
    try:
        return train_lensnet(base, train_config(label_dir, out_dir, rows, steps), info)
    finally:
        D.teardown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
