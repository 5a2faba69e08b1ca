"""Evaluation probes: sane values on models that can and cannot copy; report, targets and the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from standin import evaluate as E
from standin import targets

from .conftest import generated_books, tiny_vocab_llama, v1_dir


class SuffixOracle(torch.nn.Module):
    """A perfect in-context copier: predicts the token that followed the longest earlier match of the
    current suffix (logit 30 there, 0 elsewhere), and has no knowledge beyond the window."""

    def __init__(self, vocab: int = 16384):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the probes a device

    def forward(self, input_ids, position_ids=None, attention_mask=None, logits_to_keep=0, **_):
        B, T = input_ids.shape
        first = T - logits_to_keep if logits_to_keep else 0  # only the kept positions are materialised
        out = torch.zeros(B, T - first, self.vocab)
        for b in range(B):
            x = input_ids[b].numpy()
            prev = np.zeros(T, dtype=np.int64)  # match length of the suffix ending at t-1, per earlier end s
            for t in range(T):
                cur = np.zeros(T, dtype=np.int64)
                eq = x[:t] == x[t]
                cur[:t] = np.where(eq, np.concatenate([[0], prev[: t - 1]]) + 1 if t else 0, 0)
                prev = cur
                if t >= first and t and cur[:t].max() > 0:
                    s = t - 1 - int(np.argmax(cur[:t][::-1]))  # the latest of the longest matches
                    out[b, t - first, x[s + 1]] = 30.0
        return SimpleNamespace(logits=out)


@pytest.fixture(scope="module")
def book_tokens(tokenizer):
    from standin.corpus import encode_docs

    return encode_docs(tokenizer, generated_books(4, 20_000), tokenizer.eos_token_id).astype(np.int64)


def test_copy_probe_separates_a_copier_from_a_random_model(book_tokens):
    rows = E.rows_at(book_tokens, E.spread_windows(book_tokens, 2, 160), 160)
    oracle = E.copy_probe(SuffixOracle(), rows, (48, 112), block=32, batch=2)
    rand = E.copy_probe(tiny_vocab_llama(), rows, (48, 112), block=32, batch=2)
    for d in (48, 112):
        copy, nocopy = oracle[d]
        assert copy.mean() < 3.0 < nocopy.mean()  # copies almost free, fresh text not
        rc, rn = rand[d]
        assert abs(rc.mean() - rn.mean()) < 0.05 and 9.0 < rn.mean() < 10.5  # ~log(16384), blind to copies


def test_passkey_and_facts_on_a_copier(tokenizer, book_tokens):
    rows, alen, gaps = E.passkey_rows(tokenizer, book_tokens, 6, seq=256, gaps=(16, 64, 180))
    assert all(r.size == 256 for r in rows) and set(gaps.tolist()) == {16, 64, 180}
    hits = E.answer_hits(SuffixOracle(), rows, alen, batch=3)
    assert hits.mean() == 1.0  # the benchmark wording is answerable by copying the statement's continuation
    assert E.answer_hits(tiny_vocab_llama(), rows, alen, batch=3).mean() == 0.0
    f_rows, f_alen, ks, _ = E.fact_rows(tokenizer, book_tokens, 8, seq=256)
    assert all(r.size == 256 for r in f_rows) and set(ks.tolist()) == {1, 2, 3, 4}
    f_hits = E.answer_hits(SuffixOracle(), f_rows, f_alen, batch=4)
    assert f_hits.mean() <= 0.5  # a different question frame defeats plain continuation copying


def test_attention_crosses_a_position_skip(book_tokens):
    m = tiny_vocab_llama()
    x = torch.from_numpy(book_tokens[:64].copy())[None]
    y = x.clone()
    y[0, :8] = (y[0, :8] + 1) % 16384
    pos = torch.arange(64)[None].clone()
    pos[:, 32:] += 60000
    a, b = E.logits_of(m, x, pos), E.logits_of(m, y, pos)
    assert (a[0, 40:] - b[0, 40:]).abs().max() > 1e-4  # tokens after the skip still see those before it


def test_wilson_and_targets():
    w = E.wilson(np.array([1] * 90 + [0] * 10))
    assert w["value"] == 0.9 and w["lo"] < 0.9 < w["hi"] and w["n"] == 100
    assert E.wilson(np.zeros(0))["n"] == 0
    rep = {"copy_nll": {"1984": 0.9, "1024": 1.2}, "passkey_top1_in_view": 0.95, "fact_exact_in_view": 0.5,
           "val_nll": 3.40, "val_nll_v1": 3.38, "skip_nll": {"0": 3.5, "60000": 3.6},
           "skip_nll_v1": {"0": 3.5, "60000": 3.5}}
    met = {r["target"].split(" (")[0]: r["met"] for r in targets.check(rep)}
    assert list(met.values()) == [True, False, True, False, True, False]
    assert "**missed**" in targets.table(rep) and targets.check({})[0]["met"] is False


@pytest.mark.skipif(v1_dir() is None, reason="v1 model dir not in this checkout")
def test_v1_copies_better_with_the_copy_than_without(book_tokens):
    m = E.load_model(str(v1_dir()), torch.device("cpu"))
    rows = E.rows_at(book_tokens, E.spread_windows(book_tokens, 2, 300), 300)
    (copy, nocopy), = E.copy_probe(m, rows, (256,), batch=2).values()
    assert copy.mean() < nocopy.mean() - 0.3  # v1 copies weakly but clearly (model card: 2.61 vs 3.61)


def test_run_writes_report(tiny_dir, tmp_path, tokenizer):
    dev = tmp_path / "dev"
    dev.mkdir()
    for i, b in enumerate(generated_books(2, 20_000)):
        (dev / f"book{i}.txt").write_text(b)
    sizes = {"val": 2, "copy": 1, "passkey": 3, "fact": 4, "skip": 2}
    rep = E.run(str(tiny_dir), str(tiny_dir), [str(dev)], torch.device("cpu"), sizes, seq=192, batch=4,
                distances=(32, 64), gaps=(16, 48))
    for key in ("model_dir", "model_sha256", "val_nll", "val_nll_v1", "copy_nll", "passkey_top1_in_view",
                "fact_exact_in_view", "skip_nll", "skip_nll_v1", "targets", "run"):
        assert key in rep, key
    assert rep["val_nll"] == rep["val_nll_v1"] and rep["val_nll_diff"]["value"] == 0.0  # same model, same rows
    assert set(rep["copy_nll"]) == {"32", "64"} and rep["models"]["v2"]["passkey_top1_in_view"]["n"] == 3
    assert len(rep["model_sha256"]) == 64
    E.write(rep, str(tmp_path / "r.json"), str(tmp_path / "r.md"))
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["targets"] == rep["targets"] and "## Targets" in (tmp_path / "r.md").read_text()
    assert targets.main([str(tmp_path / "r.json")]) == 0


def test_cli_rejects_a_bad_model_dir(tmp_path, capsys):
    assert E.main(["--model", str(tmp_path), "--dev", str(tmp_path)]) == 2
    assert "not a model dir" in capsys.readouterr().err
