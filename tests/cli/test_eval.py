"""``megacontext eval gist`` (and its window loader) end to end on a tiny saved model, a random GistNet
and a hand-built token cache."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from megacontext.cli import eval as eval_cli
from megacontext.data.token_cache import FORMAT, INDEX_FILE, TOKENS_FILE, VERSION
from megacontext.gistnet.eval.run import load_windows


def write_cache(path, docs: dict[str, tuple[str, int]], vocab: int = 128, seed: int = 0):
    """A token cache written directly in its on-disk format: {doc_id: (domain, length)} of random ids."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    entries, chunks, start = [], [], 0
    for doc_id, (domain, length) in docs.items():
        chunks.append(rng.integers(0, vocab, length, dtype=np.uint16))
        entries.append({"doc_id": doc_id, "domain": domain, "start": start, "length": length, "meta": {}})
        start += length
    np.concatenate(chunks).tofile(path / TOKENS_FILE)
    (path / INDEX_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "dtype": "uint16",
                                               "vocab_size": vocab, "tokenizer_fingerprint": "test",
                                               "num_tokens": start, "skipped": {}, "docs": entries}))
    return path


def parse(argv):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="sub"))
    return parser.parse_args(argv)


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path / "cache", {"b1": ("books", 400), "b2": ("books", 300), "c1": ("code", 500),
                                            "short": ("dialogue", 50)})


def test_load_windows_per_domain(cache):
    wins = load_windows([str(cache)], 128, 8, n=4, seed=1)
    assert set(wins) == {"books", "code"}  # dialogue has no document long enough: skipped with a warning
    assert wins["books"].tokens.shape == (4, 136) and wins["code"].tokens.shape == (4, 136)
    assert set(wins["books"].docs) <= {"0:0", "0:1"} and set(wins["code"].docs) == {"0:2"}
    again = load_windows([str(cache)], 128, 8, n=4, seed=1)
    assert all(np.array_equal(wins[d].tokens, again[d].tokens) for d in wins)
    with pytest.raises(ValueError, match=r"\['dialogue'\]"):
        load_windows([str(cache)], 128, 8, n=4, domains=["dialogue"])


def test_eval_gist_writes_json_and_markdown(tmp_path, tiny_model_dir, cache, capsys):
    from megacontext.base import FrozenBase

    gn = pytest.importorskip("megacontext.gistnet.model")
    GistNet, GistNetConfig = gn.GistNet, gn.GistNetConfig

    base = FrozenBase.load(str(tiny_model_dir), device="cpu")
    GistNet(GistNetConfig(layers=1), base.d_model, base.embed_norm).save(tmp_path / "gn", base)
    out = tmp_path / "results"
    args = parse(["gist", "--base", str(tiny_model_dir), "--gistnet", str(tmp_path / "gn"), "--cache", str(cache),
                  "--windows", "2", "--context", "128", "--horizon", "8", "--gisted", "96",
                  "--batch-size", "2", "--n-boot", "50", "--cram.windows", "2", "--cram.steps", "2",
                  "--recon.cram-blocks", "2", "--recon.cram-steps", "2",
                  "--out-dir", str(out), "--scores", str(tmp_path / "s.npz"), "--device", "cpu"])
    assert args.func(args) == 0
    report = json.loads((out / "gist_eval.json").read_text())
    assert report["windows"] == {"books": 2, "code": 2} and report["bootstrap_unit"] == "document"
    assert set(report["run"]) >= {"command", "commit", "machine"}
    assert report["config"]["gisted"] == [96] and report["config"]["cram"]["steps"] == 2
    books = report["summary"]["books"]
    assert set(books) == {"horizon", "copy", "cram", "recon"}
    assert set(books["horizon"]["lod1-96of128"]["variants"]) == {"raw", "gist", "gist_wrong", "meanpool", "drop"}
    assert set(books["recon"]["lod1-block"]) == {"gist", "gist_wrong", "meanpool", "none", "cram",
                                                 "gist_on_cram_rows"}
    assert books["recon"]["lod1-block"]["cram"]["acc"]["n"] == 2
    names = [t["target"] for t in report["targets"]]
    assert len(names) == 3 and any(n.startswith("reconstruction accuracy") for n in names)
    md = (out / "gist_eval.md").read_text()
    assert "# Gist substitutability evaluation" in md and md.strip() in capsys.readouterr().out
    assert "Reconstruction from one vector" in md
    assert "books/horizon/lod1-96of128/gist" in np.load(tmp_path / "s.npz").files
