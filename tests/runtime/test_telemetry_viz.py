"""Telemetry records/summary/JSONL round trip and the focus-map renderings."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.runtime.focus_map import focus_runs, lod_map, residency
from megacontext.runtime.telemetry import StageTimer, StepRecord, Telemetry, TelemetryConfig, read_jsonl
from megacontext.runtime.viz import ascii_map, ascii_strip, lod_matrix, render_log


def _tiling(draw_levels: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Build a legal tiling (levels, indices, tokens covered) from a list of levels."""
    levels, indices, pos = [], [], 0
    for lv in draw_levels:
        span = 1024 if lv == 2 else 32
        if pos % span:
            lv, span = 1, 32
        levels.append(lv)
        indices.append(pos // span)
        pos += span
    return torch.tensor(levels), torch.tensor(indices), pos


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=40), st.integers(0, 31))
def test_lod_map_one_char_per_block(lvls, tail):
    levels, indices, covered = _tiling(lvls)
    m = lod_map(levels, indices, covered + tail)
    assert len(m) == covered // 32 + (1 if tail else 0)
    assert m.count("2") == 32 * int((levels == 2).sum())
    assert m.count("1") == int((levels == 1).sum())
    assert sum(residency(m).values()) == pytest.approx(1.0)


def test_record_rates_and_jsonl_roundtrip(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path, cfg=TelemetryConfig(every=1))
    for i in range(3):
        levels, indices, covered = _tiling([0, 1] * (i + 1))
        tel.log(StepRecord(step=i, num_tokens=covered, phase="ingest", entries=4, wc_cost=64, w_max=128,
                           expands=i, collapses=1, tiling=(levels, indices), latency_ms={"gist": 1.0}))
    summary = tel.close()
    steps, s2 = read_jsonl(path)
    assert len(steps) == 3 and s2 == json.loads(json.dumps(summary))
    assert steps[2]["swap_rate"] == pytest.approx(3 / 4)
    assert steps[0]["utilisation"] == pytest.approx(0.5)
    assert summary["expands"] == 3 and summary["collapses"] == 3
    assert summary["latency_ms_total"]["gist"] == pytest.approx(3.0)


def test_aggregated_records_sum_their_steps(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path, cfg=TelemetryConfig(every=4, map_every=2))
    for i in range(10):
        levels, indices, covered = _tiling([1] * (i + 1) + [0])
        tel.log(StepRecord(step=i, num_tokens=covered, phase="ingest", entries=i + 2, wc_cost=40, w_max=64,
                           expands=1, collapses=0, tiling=(levels, indices), latency_ms={"lens": 0.5}))
    summary = tel.close()
    steps, _ = read_jsonl(path)
    assert [s["steps"] for s in steps] == [4, 4, 2] and [s["step"] for s in steps] == [3, 7, 9]
    assert ["focus" in s for s in steps] == [True, False, True]  # every 2nd record, and the last one
    assert sum(s["expands"] for s in steps) == 10 and summary["steps"] == 10
    assert steps[0]["latency_ms"]["lens"] == pytest.approx(2.0)
    assert summary["mean_swap_rate"] == pytest.approx(sum(1 / (i + 2) for i in range(10)) / 10, abs=1e-5)


def test_damaged_lines_are_errors_and_runs_pool_like_blocks(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path, cfg=TelemetryConfig(every=1))
    levels, indices, covered = _tiling([2, 1, 0, 0])
    for i in range(3):
        tel.log(StepRecord(step=i, num_tokens=covered, phase="ingest", entries=4, wc_cost=40, w_max=64,
                           tiling=(levels, indices)))
    tel.close()
    raw = path.read_text().splitlines()
    raw[1] = raw[1].replace('"wc_cost":40', '"wc_cost":41')  # valid JSON, wrong value
    path.write_text("\n".join(raw) + "\n")
    with pytest.raises(ValueError, match="t.jsonl:2: fails its checksum"):
        read_jsonl(path)
    lods = lod_map(levels, indices, covered)
    for width in (1, 3, 7, 40):
        assert ascii_strip({"focus": focus_runs(levels, covered)}, width) == ascii_strip(lods, width)


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "step"\n{"type": "summary"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(bad)


def test_stage_timer_drains():
    t = StageTimer()
    with t.stage("lens"):
        sum(range(1000))
    first = t.drain()
    assert first["lens"] > 0 and t.drain()["lens"] == 0
    with pytest.raises(ValueError, match="unknown telemetry stage"), t.stage("nope"):
        pass


def test_ascii_keeps_finest_level():
    assert ascii_strip("2" * 99 + "0", width=10)[-1] == "#"
    assert ascii_strip("1" * 10, width=10) == "=" * 10


def test_lod_matrix_and_renders(tmp_path):
    path = tmp_path / "t.jsonl"
    tel = Telemetry(path, cfg=TelemetryConfig(every=1, map_every=1))
    for i in range(1, 30):
        levels, indices, covered = _tiling([1] * (i - 1) + [0])
        tel.log(StepRecord(step=i, num_tokens=covered, phase="ingest", entries=i, wc_cost=i + 31, w_max=64,
                           tiling=(levels, indices)))
    tel.close()
    steps, _ = read_jsonl(path)
    mat, tok_per_col, ids = lod_matrix(steps, max_rows=10, max_cols=8)
    assert mat.shape[0] == len(ids) <= 10 and mat.shape[1] <= 8
    assert mat[0, -1] == -1 and mat[-1, -1] == 0  # history grows; the newest block is raw
    text = ascii_map(steps, width=30, height=5)
    assert "#" in text and "=" in text
    out = render_log(path, tmp_path / "viz")
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = out["html"].read_text()
    assert "data:image/png;base64," in page and "focus map" in page
    with pytest.raises(ValueError, match="no refocus steps"):
        lod_matrix([])
