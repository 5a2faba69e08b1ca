"""benchmarks/bench_headline.py: parts merged only when they scored the same samples; targets computed, not typed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_headline.py"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("bench_headline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(task, system, w, value, metric="nll"):
    return {"task": task, "system": system, "w_max": w, "metric": metric, "group": "all", "n": 8,
            "value": value, "lo": value - 0.1, "hi": value + 0.1}


def _write(path: Path, systems: list[str], rows: list[dict], skipped=(), chunk=32):
    path.mkdir(parents=True)
    meta = {"command": "megacontext bench ...", "commit": "abc", "machine": "test", "base_model": "b",
            "base_fingerprint": "f", "dtype": "float32",
            "config": {"systems": systems, "chunk": chunk, "seed": 0, "out_dir": str(path)}}
    (path / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "cost": [],
                                                   "skipped": list(skipped)}))


def test_merge_checks_and_reports(mod, tmp_path):
    skip = [{"system": "bm25", "task": "*", "reason": "rank_bm25 is not installed"}]
    _write(tmp_path / "probes", ["truncation", "bm25", "megacontext", "megacontext-recency", "megacontext-oracle"],
           [_row("passkey", "truncation", 1024, 5.0), _row("passkey", "megacontext", 1024, 4.0),
            _row("passkey", "megacontext-recency", 1024, 5.2), _row("passkey", "megacontext-oracle", 1024, 3.2),
            _row("passkey", "megacontext", 1024, 0.25, metric="accuracy")], skip)
    _write(tmp_path / "probes_bm25", ["bm25", "truncation"],
           [_row("passkey", "bm25-absolute", 1024, 4.5), _row("passkey", "truncation", 1024, 5.0)])
    _write(tmp_path / "lingua", ["llmlingua"], [_row("passkey", "llmlingua", 1024, 5.5)], chunk=256)
    mod.main(["--parts", str(tmp_path / "probes"), str(tmp_path / "probes_bm25"), str(tmp_path / "lingua"),
              "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [p["name"] for p in data["parts"]] == ["lingua", "probes"]  # equal samples merged, other chunk apart
    assert data["parts"][1]["skipped"] == []  # bm25 ran in the second invocation
    checks = {(c["target"], c["part"]): c for c in data["targets"]}
    assert checks[("megacontext beats bm25-absolute on passkey NLL", "probes")]["met"] is True
    gap = checks[("megacontext closes >= 0.5 of the recency -> oracle gap on passkey", "probes")]
    assert gap["gap_closed"] == pytest.approx((5.2 - 4.0) / (5.2 - 3.2)) and gap["met"] is True
    md = (tmp_path / "out" / "results.md").read_text()
    assert "0.250 [0.150, 0.350]" in md  # passkey accuracy beside the NLL


def test_merge_refuses_parts_that_disagree(mod, tmp_path):
    _write(tmp_path / "a", ["truncation"], [_row("passkey", "truncation", 1024, 5.0)])
    _write(tmp_path / "a2", ["truncation"], [_row("passkey", "truncation", 1024, 5.3)])
    with pytest.raises(SystemExit, match="disagree"):
        mod.main(["--parts", str(tmp_path / "a"), str(tmp_path / "a2"), "--out", str(tmp_path / "out")])
