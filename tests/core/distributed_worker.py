"""Worker for tests/test_distributed.py, launched by ``torch.distributed.run`` (gloo, CPU) or as one process.

Usage: ``distributed_worker.py MODEL_DIR OUT_DIR ROWS_PER_RANK STEPS``. Under torchrun it first checks the
collective helpers of :mod:`megacontext.core.distributed` (results to ``OUT_DIR/rank<r>.json``), then runs the
real GistNet trainer with its window source sharded by global-batch slicing (``GlobalBatchShard``), which is
the one-line trainer change the identical-results rule needs. Without torchrun it runs the unmodified
trainer on the whole global batch: the reference the test compares against.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from megacontext.core import distributed as D


def helper_checks(info: D.DistInfo) -> dict:
    r, w = info.rank, info.world
    mean = D.all_reduce_mean({"rank": torch.tensor(float(r)), "one": torch.tensor(1.0)})
    gm = D.global_mean(torch.tensor(float(r + 1)), torch.tensor(float(r + 1)))
    D.barrier()
    return {
        "rank": r, "world": w, "backend": info.backend, "main": info.main,
        "mean_rank": float(mean["rank"]), "mean_one": float(mean["one"]),
        "any_rank1": D.any_rank(r == 1), "any_none": D.any_rank(False),
        "global_mean": float(gm),  # (r + 1) * w / sum_r(r + 1)
        "split": D.split_global_batch(torch.arange(2 * w), r, w).tolist(),
    }


def main(model_dir: str, out_dir: str, rows: int, steps: int) -> None:
    from megacontext.base import FrozenBase
    from megacontext.gistnet import train as T
    from megacontext.gistnet.model import GistNetConfig
    from megacontext.gistnet.objective import ObjectiveConfig

    info = D.init_distributed("cpu")
    D.quiet_non_main_ranks(info)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if info.enabled:
        (out / f"rank{info.rank}.json").write_text(json.dumps(helper_checks(info)))
        plain = T.open_windows
        T.open_windows = lambda *a, **k: D.GlobalBatchShard(plain(*a, **k))
    torch.set_num_threads(1)
    base = FrozenBase.load(model_dir, device="cpu", dtype="float32")
    cfg = T.GistTrainConfig(
        base=model_dir, out=str(out / "ckpt"), context=128, horizon=16, batch_size=rows, steps=steps,
        lr=3e-3, warmup_lr_steps=0, val_every=0, save_every=0, log_every=1, curriculum_steps=0,
        gist_frac_start=0.5, gist_frac_end=0.5, device="cpu", dtype="float32", resume=False,
        model=GistNetConfig(layers=1, heads=2), objective=ObjectiveConfig(dense_tokens=32))
    T.train(cfg, base=base)
    D.barrier()
    D.teardown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
