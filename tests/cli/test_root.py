"""The root command: ``megacontext --version``, ``python -m megacontext`` and the registered commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

import megacontext
from megacontext.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"megacontext {megacontext.__version__}"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "megacontext", "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"megacontext {megacontext.__version__}"


@pytest.mark.parametrize("argv", [["data", "prepare"], ["train", "gistnet"], ["train", "lensnet"], ["eval", "gist"],
                                  ["eval", "focus"], ["bench"], ["demo"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and f"usage: megacontext {' '.join(argv)}" in capsys.readouterr().out


def test_eval_gist_flags_are_generated_and_documented(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "gist", "--help"])
    out = capsys.readouterr().out
    for flag in ("--cache", "--windows", "--bootstrap", "--gistnet-lod2", "--cram.steps", "--context"):
        assert flag in out


def test_missing_required_paths_are_one_line_errors(capsys):
    assert main(["eval", "focus"]) == 2
    assert "docs=() names no documents" in capsys.readouterr().err
    assert main(["eval", "gist"]) == 2
    assert "--cache" in capsys.readouterr().err


def test_wc_flags_have_real_help(capsys):
    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "gist sits at the centre of its span" in out and "longest raw suffix" in out
