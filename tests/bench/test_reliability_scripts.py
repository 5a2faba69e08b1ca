"""benchmarks/depth.py and benchmarks/reliability.py at tiny sizes on CPU (the recorded runs are long)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_depth_script_small(tmp_path, tiny_model_dir):
    out = tmp_path / "depth.json"
    threads = torch.get_num_threads()
    try:
        # at w_max 140 / recent_raw 40 the working context needs LOD3 from ~48k tokens on
        assert _load("depth").main(["--tokens", "52000", "--chunk", "13000", "--base", str(tiny_model_dir),
                                    "--gistnet", "none", "--device", "cpu", "--dtype", "float32", "--w-max", "140",
                                    "--recent-raw", "40", "--no-durable", "--fsck", "--probe", "256",
                                    "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert r["final"]["num_tokens"] == 52000 + 256 + 16 + 64 and r["final"]["tree_levels"] == 4
    assert r["chunks"][-1]["wc_top_level"] == 3 and all(c["wc_cost"] <= 140 for c in r["chunks"])
    assert r["fsck"]["ok"] and r["generate_64"]["tokens"] == 64 and r["score"]["mean_nll"] > 0
    assert r["reach_tokens"] > 250_000 and "LOD3.ctx" in r["store_bytes"]


@pytest.mark.slow
def test_reliability_script_tiny(tmp_path):
    out = tmp_path / "rel.json"
    threads = torch.get_num_threads()
    try:
        assert _load("reliability").main(["--base", "tiny", "--gistnet", "none", "--kills", "3", "--seeds", "1",
                                          "--ref-tokens", "40000", "--max-delay", "1.5", "--out", str(out),
                                          "--work", str(tmp_path / "work")]) == 0
    finally:
        torch.set_num_threads(threads)
    s = json.loads(out.read_text())["summary"]
    assert s["kills"] == 3 and s["acknowledged_tokens_lost"] == 0 and s["wrong_reads_after_reopen"] == 0
    assert s["silent_wrong_reads"] == 0 and s["corruption_trials"] > 30
