"""The demo end to end on the embedded models (fast settings; the full run is marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megacontext.core.assets import BASE_MODEL, PACKAGED

BASE_DIR = PACKAGED / BASE_MODEL


@pytest.mark.skipif(not (BASE_DIR / "model.safetensors").is_file(), reason="embedded base model missing")
def test_demo_fast(tmp_path):
    from megacontext.demo.input import ships_log
    from megacontext.demo.run import DemoConfig, run_demo

    lines: list[str] = []
    cfg = DemoConfig(out=str(tmp_path / "demo"), chars=6000, w_max=256, recent_raw=128, reference=False,
                     answer_tokens=3)
    report = run_demo(cfg, say=lines.append)
    text = "\n".join(lines)
    assert len(report["facts"]) == 3 and "truncation" in report["facts"][0]["nll"]
    # the default focus (auto) resolves to the embedded LensNet, which was trained for the embedded base
    assert set(report["recalled"]) == {"truncation", "megacontext+recency", "megacontext+lensnet"}
    assert "focus: lensnet (lensnet-19m-v2-lex)" in text
    assert "MegaContext (lensnet focus) recalled" in text and "truncation" in text
    log_text, _ = ships_log(cfg.chars, seed=cfg.seed)
    for fact in report["facts"]:
        cands = fact["candidates"]
        assert len(cands) == cfg.distractors + 1 and fact["answer"] in cands and len(set(cands)) == len(cands)
        assert all(c.strip(" .") not in log_text for c in cands if c != fact["answer"])
        for setting, nlls in fact["candidate_nll"].items():
            truth = nlls[cands.index(fact["answer"])]
            assert fact["rank"][setting] == 1 + sum(v < truth for v in nlls)
            assert abs(truth - fact["nll"][setting]) < 1e-2
    n = sum(f["rank"]["megacontext+lensnet"] == 1 for f in report["facts"])
    assert report["recalled"]["megacontext+lensnet"] == n
    assert Path(report["files"]["png"]).is_file()


@pytest.mark.slow
def test_demo_full(tmp_path):
    from megacontext.demo.run import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=str(tmp_path / "demo")), say=lambda s: None)
    assert report["tokens"] > 5000
