"""Issue 14: telemetry costs constant bytes per refocus step, rotates, can be switched off, and the focus map
is still drawn from the new records and from old logs."""

from __future__ import annotations

import json

import torch

from megacontext.api import TELEMETRY_FILE, MegaContext
from megacontext.runtime.engine import EngineConfig
from megacontext.runtime.telemetry import TelemetryConfig, read_log
from megacontext.runtime.viz import ascii_map, lod_matrix, render_log
from megacontext.wc.working_context import WorkingContextConfig

WC = WorkingContextConfig(w_max=156, recent_raw=32)


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(0))


def test_bytes_per_token_stay_flat_as_the_history_grows(tiny_base, tmp_path):
    store, ids = tmp_path / "s", _ids(80_000)
    with MegaContext.create(store, tiny_base, config=EngineConfig(wc=WC), durable=False) as mc:
        mc.ingest(ids[:20_000])
        mc.engine.telemetry.flush()
        early = (store / TELEMETRY_FILE).stat().st_size / 20_000
        mc.ingest(ids[20_000:])
        mc.engine.telemetry.flush()
        late = ((store / TELEMETRY_FILE).stat().st_size - early * 20_000) / 60_000
    assert late < 1.0 and late < 1.5 * early, (early, late)  # the old log grew with the history: ~40 B/token


def test_off_switch_and_rotation(tiny_base, tmp_path):
    off = EngineConfig(wc=WC, telemetry=TelemetryConfig(enabled=False))
    with MegaContext.create(tmp_path / "off", tiny_base, config=off, durable=False) as mc:
        mc.ingest(_ids(3000))
    assert not list((tmp_path / "off").glob("telemetry*"))
    small = EngineConfig(wc=WC, ingest_batch=32,  # one record per 32 tokens, as many as a v1 refocus log
                         telemetry=TelemetryConfig(every=1, max_bytes=4096, keep_files=2))
    with MegaContext.create(tmp_path / "rot", tiny_base, config=small, durable=False) as mc:
        mc.ingest(_ids(30_016))
    logs = sorted(p.name for p in (tmp_path / "rot").glob("telemetry*"))
    assert logs == ["telemetry.1.jsonl", "telemetry.2.jsonl", "telemetry.jsonl"]
    assert all((tmp_path / "rot" / n).stat().st_size < 4096 + 2048 for n in logs)
    steps, _ = read_log(tmp_path / "rot" / TELEMETRY_FILE)
    assert steps and steps[-1]["num_tokens"] == 30_016
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps)


def test_focus_map_from_new_records_and_old_logs(tiny_base, tmp_path):
    store = tmp_path / "s"
    deep = EngineConfig(wc=WorkingContextConfig(w_max=140, recent_raw=40))  # LOD3 from ~48k tokens on
    with MegaContext.create(store, tiny_base, config=deep, durable=False) as mc:
        mc.ingest(_ids(52_000))
        final = mc.engine.wc.levels.clone()
    steps, _ = read_log(store / TELEMETRY_FILE)
    mat, _, _ = lod_matrix(steps)
    assert mat.max() == 3 and (mat[-1] >= 0).all()  # the last row is the whole history, LOD3 included
    assert int(final.max()) == 3
    assert "focus map" in ascii_map(steps) and render_log(store / TELEMETRY_FILE, tmp_path / "viz")["png"].is_file()

    old = tmp_path / "old.jsonl"  # a log written before the bounded format: one lod_map string per step
    rows = [{"type": "step", "step": i, "num_tokens": 32 * (i + 1), "phase": "ingest", "entries": i + 1,
             "wc_cost": 40, "w_max": 64, "expands": 0, "collapses": 0, "lod_map": "1" * i + "0",
             "latency_ms": {}, "swap_rate": 0.0, "utilisation": 0.5, "residency": {}} for i in range(5)]
    old.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, _ = read_log(old)
    mat, _, _ = lod_matrix(steps)
    assert mat.shape == (5, 5) and mat[4].tolist() == [1, 1, 1, 1, 0]
