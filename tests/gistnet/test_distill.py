"""Distillation toward optimised block vectors: targets round-trip, refusal for another base, the loss trains."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megacontext.base import FrozenBase
from megacontext.core.config import ConfigError
from megacontext.core.lod import BLOCK
from megacontext.gistnet.distill import DistillTargets, TargetError, distill_loss, make_targets, optimise_vectors
from megacontext.gistnet.model import GistNet, GistNetConfig
from megacontext.gistnet.objective import ObjectiveConfig, reconstruction_logits
from megacontext.gistnet.train import GistTrainConfig, train
from tests.conftest import tiny_llama


@pytest.fixture
def base():
    return FrozenBase(tiny_llama(), name="tiny")


def _nll(base, vecs, blocks):
    return float(F.cross_entropy(reconstruction_logits(base, vecs, blocks).transpose(1, 2), blocks))


def test_optimised_vectors_reconstruct_better_and_independently(base):
    blocks = torch.randint(0, base.vocab_size, (4, BLOCK), generator=torch.Generator().manual_seed(0))
    init = torch.zeros(4, base.d_model)
    v = optimise_vectors(base, blocks, init, steps=20, lr=0.05)
    assert _nll(base, v, blocks) < _nll(base, init, blocks) - 0.01
    alone = optimise_vectors(base, blocks[:1], init[:1], steps=20, lr=0.05)
    torch.testing.assert_close(alone, v[:1], rtol=1e-4, atol=1e-5)  # a block's target ignores its batch


def test_targets_round_trip_and_refuse_another_base(base, tmp_path):
    blocks = torch.randint(0, base.vocab_size, (10, BLOCK), generator=torch.Generator().manual_seed(1))
    out = make_targets(base, blocks, tmp_path / "t", lambda b: torch.zeros(b.shape[0], base.d_model),
                       steps=2, batch=4, shard=6)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["blocks"] == 10 and meta["shards"] == 2 and meta["base_fingerprint"] == base.fingerprint
    t = DistillTargets(out, base)
    assert len(t) == 10 and torch.equal(t.blocks, blocks)
    b, v = t.sample(3, torch.Generator().manual_seed(0))
    assert b.shape == (3, BLOCK) and v.shape == (3, base.d_model)
    other = FrozenBase(tiny_llama(seed=1), name="other")
    with pytest.raises(TargetError, match="fingerprint"):
        DistillTargets(out, other)
    with pytest.raises(TargetError, match="no distillation targets"):
        DistillTargets(tmp_path, base)


def test_distill_loss_is_zero_for_aligned_vectors_and_ignores_norm():
    t = torch.randn(5, 8)
    assert float(distill_loss(3.0 * t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(-t, t)) == pytest.approx(2.0, abs=1e-6)


def test_training_with_distillation_pulls_gists_toward_targets(base, tmp_path):
    blocks = torch.randint(0, base.vocab_size, (16, BLOCK), generator=torch.Generator().manual_seed(2))
    targets = make_targets(base, blocks, tmp_path / "t", lambda b: torch.randn(b.shape[0], base.d_model),
                           steps=1, batch=16)
    cfg = GistTrainConfig(out=str(tmp_path / "run"), context=96, horizon=16, batch_size=2, steps=12, log_every=1,
                          val_every=0, save_every=0, warmup_lr_steps=1, model=GistNetConfig(layers=1, heads=2),
                          distill=str(targets), lr=5e-3,
                          objective=ObjectiveConfig(horizon_weight=0.0, dense="none", distill_weight=1.0,
                                                    distill_batch=16))
    train(cfg, base=base)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cos = [x["distill_cos"] for x in lines if "distill_cos" in x]
    assert len(cos) >= 10 and cos[-1] > cos[0]
    net = GistNet.load(tmp_path / "run", base)
    assert net is not None


def test_config_needs_targets_and_level_1():
    with pytest.raises(ConfigError, match="distill"):
        GistTrainConfig(objective=ObjectiveConfig(distill_weight=1.0))
    with pytest.raises(ConfigError, match="distill"):
        GistTrainConfig(level=2, context=2048, distill="x", objective=ObjectiveConfig(distill_weight=1.0))
