"""eval focus: recency vs LensNet vs the counterfactual oracle end to end, evidence coverage, the run's
document split."""

import pytest
import torch

from megacontext.data.documents import load_docs, split_docs
from megacontext.focus.evaluation import FocusEvalConfig, FocusRunConfig, end_to_end, evidence_raw_fraction
from megacontext.focus.lens import LensPolicy
from megacontext.lensnet.model import LensNet, LensNetConfig
from megacontext.tree.compressor import MeanPoolCompressor
from megacontext.wc import WorkingContext, WorkingContextConfig


def test_end_to_end_runs_all_policies(tiny_base):
    docs = [torch.randint(1, 128, (1400,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    net = LensNet(LensNetConfig(layers=1, tail_tokens=8), tiny_base.d_model)
    cfg = FocusEvalConfig(budgets=(192,), recent_raw=32, horizon=8, points=1, steps=2, min_history=1024,
                          oracle_max_expand=4, qmsum_queries=0)
    out = end_to_end(tiny_base, MeanPoolCompressor.from_base(tiny_base), docs, LensPolicy(net, tiny_base), 1.0, cfg)
    r = out["192"]
    assert set(r) >= {"recency", "lensnet", "oracle", "gap_closed"}
    # an untrained LensNet is neutral, so it keeps the recency tiling and its NLL
    assert abs(r["lensnet"]["nll"] - r["recency"]["nll"]) < 1e-5


def test_evidence_raw_fraction():
    wc = WorkingContext.assemble(1024, WorkingContextConfig(w_max=256, recent_raw=64))
    assert evidence_raw_fraction(wc, [(1000, 1024)]) == 1.0
    assert evidence_raw_fraction(wc, [(0, 32)]) == 0.0


def test_run_config_needs_documents_and_splits_them_by_position(tmp_path):
    with pytest.raises(ValueError, match="names no documents"):
        FocusRunConfig()
    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text("x " * (i + 1))
    docs, names = load_docs([str(tmp_path)], lambda text: [1] * len(text.split()))
    assert names == [f"d{i}" for i in range(6)] and [len(d) for d in docs] == [1, 2, 3, 4, 5, 6]
    held, held_names = split_docs(docs, names, 4, held_out=True)
    train, _ = split_docs(docs, names, 4, held_out=False)
    assert held_names == ["d0", "d4"] and len(train) == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_docs([str(tmp_path / "missing")], str.split)
