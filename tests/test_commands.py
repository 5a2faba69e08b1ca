"""CLI smoke tests (megacontext.cli.main on a tiny model directory) and the demo."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megacontext.cli import main
from tests.conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]
BASE_DIR = REPO / "models" / "base-llama-19m"


@pytest.fixture
def tiny_dir_with_tokenizer(tmp_path):
    """A tiny random Llama with the embedded model's tokenizer (vocab 16384), saved like a hub model."""
    path = tmp_path / "tiny"
    tiny_llama(vocab=16384).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASE_DIR / name, path / name)
    return path


@pytest.mark.parametrize("cmd", ["demo", "ingest", "generate", "score", "inspect"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: megacontext " + cmd in capsys.readouterr().out


def test_cli_roundtrip(tiny_dir_with_tokenizer, tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("The ship sailed north. " * 200)
    store = tmp_path / "store"
    common = ["--base", str(tiny_dir_with_tokenizer), "--device", "cpu"]
    assert main(["ingest", str(store), str(text), *common, "--wc.w-max", "160", "--wc.recent-raw", "64",
                 "--focus", "lexical"]) == 0
    assert "ingested" in capsys.readouterr().out
    assert main(["generate", str(store), "The ship", "--max-new-tokens", "5", *common]) == 0
    assert main(["score", str(store), str(text), *common]) == 0
    assert "mean NLL" in capsys.readouterr().out
    assert main(["inspect", str(store), "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert "focus map" in out and (store / "inspect" / "focus_map.png").is_file()
    assert main(["generate", str(tmp_path / "none"), "hi", *common]) == 2  # clear error, no traceback
    assert "not a MegaContext store" in capsys.readouterr().err


@pytest.mark.skipif(not (BASE_DIR / "model.safetensors").is_file(), reason="embedded base model missing")
def test_demo_fast(tmp_path):
    from megacontext.demo import DemoConfig, run_demo
    from megacontext.demo_input import ships_log

    lines: list[str] = []
    cfg = DemoConfig(out=str(tmp_path / "demo"), chars=6000, w_max=256, recent_raw=128, reference=False,
                     answer_tokens=3)
    report = run_demo(cfg, say=lines.append)
    text = "\n".join(lines)
    assert len(report["facts"]) == 3 and "truncation" in report["facts"][0]["nll"]
    assert set(report["recalled"]) == {"truncation", "megacontext+recency", "megacontext+lexical"}
    assert "MegaContext (lexical focus) recalled" in text and "truncation" in text
    log_text, _ = ships_log(cfg.chars, seed=cfg.seed)
    for fact in report["facts"]:
        cands = fact["candidates"]
        assert len(cands) == cfg.distractors + 1 and fact["answer"] in cands and len(set(cands)) == len(cands)
        assert all(c.strip(" .") not in log_text for c in cands if c != fact["answer"])
        for setting, nlls in fact["candidate_nll"].items():
            truth = nlls[cands.index(fact["answer"])]
            assert fact["rank"][setting] == 1 + sum(v < truth for v in nlls)
            assert abs(truth - fact["nll"][setting]) < 1e-2
    n = sum(f["rank"]["megacontext+lexical"] == 1 for f in report["facts"])
    assert report["recalled"]["megacontext+lexical"] == n
    assert Path(report["files"]["png"]).is_file()


@pytest.mark.slow
def test_demo_full(tmp_path):
    from megacontext.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=str(tmp_path / "demo")), say=lambda s: None)
    assert report["tokens"] > 5000


def test_text_generation_streams_and_stops(tiny_dir_with_tokenizer, tmp_path):
    from megacontext.api import MegaContext

    base = str(tiny_dir_with_tokenizer)
    with MegaContext.create(tmp_path / "a", base, durable=False) as mc:
        mc.ingest("The ship sailed north. " * 20)
        seen: list[str] = []
        full = mc.generate("The ship", max_new_tokens=12, on_text=seen.append)
        assert full == "".join(seen) and len(full) > 6
    stop = full[3:6]
    with MegaContext.create(tmp_path / "b", base, durable=False) as mc:
        mc.ingest("The ship sailed north. " * 20)
        pieces = list(mc.generate("The ship", max_new_tokens=12, stream=True, stop=(stop,)))
        text = "".join(pieces)
        assert text.endswith(stop) and full.startswith(text) and len(text) < len(full)
