"""benchmarks/scale.py quick mode: all three parts run on a tiny model on CPU and write scale.json/scale.md."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


def test_scale_quick_mode(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("scale_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import scale_report

    threads = torch.get_num_threads()
    try:
        rc = mod.main(["quick", "--base", str(tiny_model_dir), "--results", str(tmp_path / "res"),
                       "--work", str(tmp_path / "work"), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("scale_report", None)
    assert rc == 0
    data = json.loads((tmp_path / "res" / "scale.json").read_text())
    ingest = data["ingest"]["rows"]
    assert [r["tokens"] for r in ingest] == [8000, 24000]
    assert all(r["tok_per_s"] > 0 and 4 < r["disk_bytes_per_token"] < 10 for r in ingest)  # int32 ids + fp16 gists
    cost = data["cost"]["rows"]
    assert [r["window_start"] > 0 for r in cost] == [False, True]  # 24k tokens exceed the reach of w_max=112
    for r in cost:
        assert r["wc_cost"] <= 112
        for mode in ("score", "generate"):
            assert r[mode]["ms_per_token"] > 0 and r[mode]["stage_ms_per_refocus"]["lens"] > 0
    run = data["ddp"]["runs"]["1"]
    assert run["world"] == 1 and run["tok_per_s"] > 0 and run["scaling_efficiency"] == 1.0
    # GPU results come back as separate scale.json files and are folded in with their own provenance
    other = {**run, "world": 2, "tok_per_s": run["tok_per_s"] * 1.5, "command": "torchrun --nproc_per_node=2 x"}
    (tmp_path / "gpu.json").write_text(json.dumps({"ddp": {**data["ddp"], "runs": {"2": other}}}))
    merged = json.loads(scale_report.merge_files([tmp_path / "gpu.json"], tmp_path / "res").read_text())
    assert merged["ddp"]["runs"]["2"]["command"] == "torchrun --nproc_per_node=2 x"
    assert merged["ddp"]["runs"]["2"]["scaling_efficiency"] == 0.75 and merged["ingest"] == data["ingest"]
    md = (tmp_path / "res" / "scale.md").read_text()
    for needle in ("(a) Ingest", "(b) Per-token cost", "(c) GistNet DDP", data["ingest"]["commit"]):
        assert needle in md
