"""Issue 14: every user error of the runtime commands is exit code 2 and one line, never a traceback; ignored
settings are warned about; messages name only options that exist."""

from __future__ import annotations

import logging

import pytest
import torch

from megacontext.api import MegaContext
from megacontext.base import FrozenBase
from megacontext.cli import main
from megacontext.runtime.engine import EngineConfig
from megacontext.tree import MeanPoolCompressor, MegaContextTree
from megacontext.wc.working_context import WorkingContextConfig
from tests.conftest import tiny_llama

CFG = EngineConfig(wc=WorkingContextConfig(w_max=160, recent_raw=64))


@pytest.fixture
def made(tmp_path, tiny_dir_with_tokenizer):
    """A store made from a tiny model directory with a tokenizer, and a text file."""
    store, text = tmp_path / "store", tmp_path / "in.txt"
    with MegaContext.create(store, str(tiny_dir_with_tokenizer), config=CFG, durable=False) as mc:
        mc.ingest(torch.randint(0, 128, (300,)))
    text.write_text("hello")
    return store, text


def _one_line_error(capsys, code: int, *needles: str) -> str:
    """Exit code 2, no traceback, and the error in exactly one line (model-loading progress bars aside)."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("megacontext")]
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], err
    return lines[0]


def _exit_code(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_store_path_that_is_a_file(tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code = main(["ingest", str(f), str(f), "--base", str(tiny_model_dir)])
    _one_line_error(capsys, code, "not a directory")
    code = main(["generate", str(f), "x", "--base", str(tiny_model_dir)])
    _one_line_error(capsys, code, "not a directory")


def test_second_writer(made, tiny_dir_with_tokenizer, capsys):
    store, text = made
    with MegaContext.open(store, str(tiny_dir_with_tokenizer)):
        code = main(["ingest", str(store), str(text), "--base", str(tiny_dir_with_tokenizer)])
    _one_line_error(capsys, code, "open for writing by another process")


def test_inspect_width_zero(made, capsys):
    store, _ = made
    _one_line_error(capsys, _exit_code(["inspect", str(store), "--width", "0"]), "--width", "0")
    _one_line_error(capsys, _exit_code(["inspect", str(store), "--height", "-3"]), "--height")


def test_yaml_with_wrong_types(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "in.txt"
    text.write_text("hello")
    for body, needle in (("k: abc\n", "k='abc'"), ("wc: 5\n", "wc=5"), ("wc:\n  w_max: [1]\n", "w_max=[1]"),
                         ("debug: maybe\n", "debug='maybe'"), ("k: [\n", "YAML")):
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(body)
        code = main(["ingest", str(tmp_path / "s"), str(text), "--base", str(tiny_model_dir), "--config", str(cfg)])
        _one_line_error(capsys, code, needle)
        assert not (tmp_path / "s").exists()


def test_bad_flag_values_are_one_line(tmp_path, capsys):
    _one_line_error(capsys, _exit_code(["ingest", str(tmp_path / "s"), "x", "--k", "many"]), "--k", "many")


def test_engine_flags_for_an_existing_store_are_reported_as_ignored(made, tiny_dir_with_tokenizer, capsys, caplog):
    store, text = made
    with caplog.at_level(logging.WARNING):
        code = main(["ingest", str(store), str(text), "--base", str(tiny_dir_with_tokenizer), "--wc.w-max", "4096",
                     "--focus", "lexical"])
    assert code == 0
    assert "--wc.w-max" in caplog.text and "--focus" in caplog.text and "ignored" in caplog.text


def test_half_made_store_gets_the_same_message_from_every_command(tmp_path, tiny_model_dir, capsys):
    base = FrozenBase(tiny_llama(), name="t")
    root = tmp_path / "half"
    MegaContextTree.create(root, base.d_model, base.fingerprint, MeanPoolCompressor.from_base(base)).close()
    text = tmp_path / "in.txt"
    text.write_text("hello")
    a = _one_line_error(capsys, main(["ingest", str(root), str(text), "--base", str(tiny_model_dir)]),
                        "incomplete")
    b = _one_line_error(capsys, main(["generate", str(root), "x", "--base", str(tiny_model_dir)]), "incomplete")
    assert a == b


def test_mismatch_message_names_an_option_that_exists(made, tmp_path, tiny_dir_with_tokenizer, capsys):
    from megacontext.gistnet.model import GistNet, GistNetConfig

    store, text = made
    model = str(tiny_dir_with_tokenizer)
    base = FrozenBase.load(model)
    GistNet(GistNetConfig(layers=1, heads=2), base.d_model, base.embed_norm).save(tmp_path / "g", base)
    code = main(["generate", str(store), "x", "--base", model, "--gistnet", str(tmp_path / "g")])
    err = _one_line_error(capsys, code, "--rebuild")
    assert "rebuild=True" in err
    assert main(["generate", str(store), "x", "--base", model, "--gistnet", str(tmp_path / "g"), "--rebuild",
                 "--max-new-tokens", "2"]) == 0
    with MegaContext.open(store, base) as mc:
        assert mc.tree.compressor.version.startswith("gistnet")


def test_fsck_exit_codes(made, capsys):
    store, _ = made
    assert main(["fsck", str(store)]) == 0
    assert "no damage" in capsys.readouterr().out
    path = store / "LOD0.ctx"
    raw = bytearray(path.read_bytes())
    raw[300] ^= 1
    path.write_bytes(bytes(raw))
    assert main(["fsck", str(store)]) == 1
    out = capsys.readouterr().out
    assert "LOD0.ctx" in out and "checksum" in out
    _one_line_error(capsys, main(["fsck", str(store / "nope")]), "does not exist")
