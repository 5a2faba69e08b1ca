"""megacontext.core.distributed: single-process behaviour, and 2-process gloo runs of the GistNet and LensNet trainers
that must reproduce a 1-process run with the same global batch (the identical-results rule)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megacontext.core import distributed as D

WORKER = Path(__file__).with_name("distributed_worker.py")
LENS_WORKER = Path(__file__).with_name("distributed_lens_worker.py")


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_distributed("cpu")
    assert info == D.DistInfo() and info.main and not info.enabled
    m = {"a": torch.tensor(2.0)}
    assert D.all_reduce_mean(m) is m
    assert D.any_rank(True) and not D.any_rank(False)
    assert float(D.global_mean(torch.tensor(6.0), torch.tensor(3.0))) == 2.0
    assert D.wrap_ddp(torch.nn.Linear(2, 2), info, torch.device("cpu")).__class__ is torch.nn.Linear
    assert D.rank_device(info, "cpu").type == "cpu"


def test_bad_env_is_rejected(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        D.init_distributed("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        D.init_distributed("cpu")


def test_split_and_global_batch_shard():
    batch = torch.arange(12).view(6, 2)
    parts = [D.split_global_batch(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        D.split_global_batch(batch, 0, 4)
    with pytest.raises(ValueError, match="rank=3"):
        D.split_global_batch(batch, 3, 3)

    class Counting:
        def batches(self, b):
            i = 0
            while True:
                yield torch.arange(i, i + b)
                i += b

    src = D.GlobalBatchShard(Counting())
    got = [next(iter(src.shard(r, 2).batches(3))) for r in range(2)]
    assert torch.equal(torch.cat(got), next(iter(src.batches(6))))
    with pytest.raises(ValueError, match="already shard"):
        src.shard(1, 2).shard(0, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(args: list[str], tmp: Path, worker: Path = WORKER) -> None:
    """Start 2 workers with exactly the environment torchrun gives them (without torchrun's agent process,
    which would cost one more interpreter start-up on a 2-core box)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(worker), *args], cwd=tmp, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]


def _load_worker(worker: Path = WORKER):
    spec = importlib.util.spec_from_file_location(worker.stem, worker)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_process_gloo_gistnet_matches_one_process(tmp_path, tiny_model_dir, monkeypatch):
    rows, steps = 2, 3  # 2 ranks x 2 rows == 1 process x 4 rows
    _launch_two_ranks([str(tiny_model_dir), str(tmp_path / "ddp"), str(rows), str(steps)], tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:  # the reference: the unmodified trainer, one process, the whole global batch
        _load_worker().main(str(tiny_model_dir), str(tmp_path / "single"), 2 * rows, steps)
    finally:
        torch.set_num_threads(threads)

    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(ranks):
        assert (rec["rank"], rec["world"], rec["backend"], rec["main"]) == (r, 2, "gloo", r == 0)
        assert rec["mean_rank"] == 0.5 and rec["mean_one"] == 1.0
        assert rec["any_rank1"] and not rec["any_none"]
        assert rec["global_mean"] == pytest.approx((r + 1) * 2 / 3)
        assert rec["split"] == [2 * r, 2 * r + 1]

    ddp = load_file(str(tmp_path / "ddp" / "ckpt" / "model.safetensors"))
    one = load_file(str(tmp_path / "single" / "ckpt" / "model.safetensors"))
    assert ddp.keys() == one.keys()
    for k in one:
        assert torch.allclose(ddp[k], one[k], atol=2e-5, rtol=1e-4), (k, float((ddp[k] - one[k]).abs().max()))

    # the comparison is not vacuous: training moved the weights away from the seeded initialisation
    from megacontext.base import FrozenBase
    from megacontext.gistnet.model import GistNet, GistNetConfig

    base = FrozenBase.load(str(tiny_model_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)  # what the trainer does before building GistNet (seed=0)
    init = GistNet(GistNetConfig(layers=1, heads=2), base.d_model, embed_norm=base.embed_norm).state_dict()
    assert max(float((one[k] - init[k].float()).abs().max()) for k in one) > 1e-3
    # rank 0 alone wrote one metrics line per step
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))


def test_two_process_gloo_lensnet_matches_one_process(tmp_path, tiny_model_dir, monkeypatch):
    from megacontext.base import FrozenBase
    from megacontext.lensnet.model import LensNet

    worker = _load_worker(LENS_WORKER)
    base = FrozenBase.load(str(tiny_model_dir), device="cpu", dtype="float32")
    labels = tmp_path / "labels"
    worker.make_labels(labels, base.d_model, base.fingerprint)
    rows, steps = 2, 4  # 2 ranks x 2 contexts == 1 process x 4 contexts
    _launch_two_ranks([str(tiny_model_dir), str(labels), str(tmp_path / "ddp"), str(rows), str(steps)], tmp_path,
                      LENS_WORKER)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        worker.main(str(tiny_model_dir), str(labels), str(tmp_path / "single"), 2 * rows, steps)
    finally:
        torch.set_num_threads(threads)

    ddp = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    one = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    assert ddp.keys() == one.keys()
    for k in one:
        a, b = ddp[k], one[k]
        if k.endswith("kv.bias"):
            # the key half of the bias cannot change attention (softmax is shift-invariant), so its true
            # gradient is 0 and AdamW turns float noise into steps of ~lr: only the value half is comparable
            a, b = a[a.shape[0] // 2:], b[b.shape[0] // 2:]
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (k, float((a - b).abs().max()))
    # and the two nets score alike (this covers the key biases too)
    nets = [LensNet.load(tmp_path / run / "final", base)[0] for run in ("ddp", "single")]
    from megacontext.lensnet.labels import LabelSet
    from megacontext.lensnet.train import run_net

    batch = LabelSet.load(labels).collate(list(range(8)))
    with torch.no_grad():
        s_ddp, s_one = (run_net(n, base, batch) for n in nets)
    assert torch.allclose(s_ddp, s_one, atol=2e-5), float((s_ddp - s_one).abs().max())
    torch.manual_seed(0)  # what the trainer does before building LensNet (seed=0)
    init = LensNet(worker.train_config("", "", rows, steps).model, base.d_model).state_dict()
    assert max(float((one[k] - init[k].float()).abs().max()) for k in one) > 1e-3

    # rank 0 alone logged: one line for the last step, whose loss terms are the global-batch values
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [steps] == [r["step"] for r in ref]
    for k in ("loss", "regression", "ranking", "budget", "spearman"):
        assert lines[0][k] == pytest.approx(ref[0][k], abs=1e-4), k
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world"] == 2
