"""CLI smoke tests of the runtime commands (megacontext.cli.main on a tiny model directory)."""

from __future__ import annotations

import pytest

from megacontext.cli import main


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
