"""End to end on a tiny random base: systems x tasks x budgets -> JSON, markdown, PNG."""

from __future__ import annotations

import json

import torch

from megacontext.bench.harness import BenchResult, aggregate, run_systems
from megacontext.bench.report import markdown, write_report
from megacontext.bench.sinks import AttentionSinks, SinksConfig
from megacontext.bench.suite import BenchConfig
from megacontext.bench.tasks import TokenDoc, far_recall_samples, passkey_samples, perplexity_samples
from megacontext.bench.truncation import FullAttention, Truncation, WindowConfig


def _encode(text):
    return [ord(c) % 128 for c in text]


def test_run_aggregate_and_report(tiny_base, tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = [TokenDoc(f"d{i}", torch.randint(0, 128, (500,), generator=g)) for i in range(2)]
    tasks = {"books_ppl": perplexity_samples(docs, 300),
             "far_recall": far_recall_samples(docs, [200, 400], 1, passage_min=8, passage_max=16, lead=16),
             "passkey": passkey_samples(docs, _encode, [100, 300], 1, lead=16)}
    win = WindowConfig(chunk=32)
    systems = [FullAttention(160, win), Truncation(win), AttentionSinks(SinksConfig(chunk=32))]
    result = BenchResult()
    records = run_systems(tiny_base, systems, tasks, (64, 128), result)
    assert len(records) == 3 * 3 * 2
    aggregate(records, (0, 64, 256, 1024), n_boot=20, seed=0, result=result)
    groups = {(r["task"], r["system"], r["w_max"], r["metric"]): set() for r in result.rows}
    for r in result.rows:
        groups[(r["task"], r["system"], r["w_max"], r["metric"])].add(r["group"])
    assert groups[("books_ppl", "truncation", 64, "nll")] == {"0-64", "64-256", "256-1024", "all"}
    assert groups[("books_ppl", "full", 64, "nll")] == {"0-64", "64-256", "all"}  # NaN past its window
    assert groups[("passkey", "sinks-compact", 128, "accuracy")] == {"100", "300", "all"}
    assert all(c["flops_per_token"] > 0 for c in result.cost if c["scored_tokens"])
    assert any(c["system"] == "full" and c["scored_tokens"] == 0 for c in result.cost)  # far recall > window
    meta = {"command": "test", "commit": "x", "machine": "CPU", "base_model": "tiny", "base_fingerprint": "f",
            "dtype": "float32", "config": BenchConfig(name="unit", books_dir="books", qmsum_paths=("qmsum",)).to_dict()}
    files = write_report(result, meta, tmp_path)
    names = {f.name for f in files}
    assert {"results.json", "results.md", "nll_vs_budget.png", "far_recall_nll_vs_distance.png"} <= names
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["commit"] == "x"
    assert "| truncation | 64 |" in markdown(result, meta)
