"""Content-aware GistNet objective terms: planted copies, reconstruction, the collapse metric."""

from __future__ import annotations

import pytest
import torch

from megacontext.base import FrozenBase
from megacontext.core.config import ConfigError
from megacontext.core.lod import BLOCK
from megacontext.gistnet.model import GistNet, GistNetConfig
from megacontext.gistnet.objective import (
    ObjectiveConfig,
    gist_similarity,
    make_prefix,
    plant_copies,
    recon_prefix,
    reconstruction_logits,
    reconstruction_loss,
    substitution_loss,
    tail_logits,
)
from megacontext.gistnet.substitute import splice
from megacontext.gistnet.train import GistTrainConfig
from tests.conftest import tiny_llama

MODEL = GistNetConfig(layers=1, heads=2)


@pytest.fixture
def base():
    return FrozenBase(tiny_llama(), name="tiny")


def test_plant_copies_repeats_a_gisted_block_in_the_planted_rows_only():
    tokens = torch.arange(8 * 160).view(8, 160)  # every id distinct: a copy is recognisable
    out, planted = plant_copies(tokens, gisted_blocks=2, frac=0.5, gen=torch.Generator().manual_seed(3))
    assert 0 < int(planted.sum()) < 8
    assert torch.equal(out[:, :-BLOCK], tokens[:, :-BLOCK])
    for r in range(8):
        tail = out[r, -BLOCK:]
        if planted[r]:
            starts = [int(tokens[r, b * BLOCK]) for b in range(2)]
            assert int(tail[0]) in starts  # a copy of block 0 or 1 of the same row
            assert torch.equal(tail, tail[0] + torch.arange(BLOCK))
        else:
            assert torch.equal(tail, tokens[r, -BLOCK:])


def test_plant_copies_frac_zero_and_one():
    tokens = torch.randint(0, 50, (4, 128))
    same, none = plant_copies(tokens, 2, 0.0, torch.Generator().manual_seed(0))
    assert same is tokens and not none.any()
    _, every = plant_copies(tokens, 2, 1.0, torch.Generator().manual_seed(0))
    assert every.all()


def test_copy_term_is_the_kl_on_the_planted_copy_and_reaches_gistnet(base):
    """copy_kl equals KL(raw || gisted) on the copy tokens (first excluded) computed by hand; its gradient
    reaches GistNet and nothing accumulates in the frozen base."""
    torch.manual_seed(0)
    net = GistNet(MODEL, base.d_model, base.embed_norm)
    with torch.no_grad():
        for p in net.parameters():  # a non-trivial net (an untrained one has a zero output projection)
            p.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, base.vocab_size, (4, 160))
    cfg = ObjectiveConfig(dense="none", horizon_weight=0.0, copy_frac=1.0, copy_weight=1.0)
    loss, metrics = substitution_loss(net, base, tokens, 40, 2, cfg, gen=torch.Generator().manual_seed(1))
    loss.backward()
    assert {"copy_kl", "copy_nll", "copy_nll_raw", "gist_cos"} <= set(metrics)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in base.model.parameters())

    planted, _ = plant_copies(tokens, 2, 1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefix, ppos, raw_start = make_prefix(planted, base, net, 2)
        student = tail_logits(base, *splice(base, planted, raw_start, prefix, ppos), BLOCK - 1)
        teacher = tail_logits(base, *splice(base, planted, 0), BLOCK - 1)
    t, s_ = teacher.log_softmax(-1), student.log_softmax(-1)
    expected = (t.exp() * (t - s_)).sum(-1).mean()
    torch.testing.assert_close(metrics["copy_kl"], expected, rtol=1e-4, atol=1e-7)


def test_recon_prefix_uses_bos_or_eos():
    assert recon_prefix(FrozenBase(tiny_llama(bos_token_id=5, eos_token_id=7), name="a")) == [5]
    assert recon_prefix(FrozenBase(tiny_llama(bos_token_id=None, eos_token_id=7), name="b")) == [7]


def test_reconstruction_logits_depend_only_on_own_vector_and_block(base):
    """Row i's logits must not change when another row's vector or block changes (no cross-row leak)."""
    torch.manual_seed(0)
    vecs = torch.randn(3, base.d_model)
    blocks = torch.randint(0, base.vocab_size, (3, BLOCK))
    a = reconstruction_logits(base, vecs, blocks)
    vecs2, blocks2 = vecs.clone(), blocks.clone()
    vecs2[1] += 1.0
    blocks2[2] = (blocks2[2] + 1) % base.vocab_size
    b = reconstruction_logits(base, vecs2, blocks2)
    assert a.shape == (3, BLOCK, base.vocab_size)
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4  # the vector is read


def test_reconstruction_loss_trains_gists_toward_their_block(base):
    torch.manual_seed(0)
    net = GistNet(MODEL, base.d_model, base.embed_norm)
    tokens = torch.randint(0, base.vocab_size, (2, 160))
    cfg = ObjectiveConfig(dense="none", horizon_weight=0.0, recon_weight=1.0, recon_blocks=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    seen = []
    for _ in range(10):
        loss, metrics = substitution_loss(net, base, tokens, 16, 2, cfg, gen=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(float(metrics["recon_nll"]))
    assert seen[-1] < seen[0]
    assert 0.0 <= float(metrics["recon_acc"]) <= 1.0


def test_reconstruction_subset_is_capped(base):
    gists = torch.randn(10, base.d_model)
    blocks = torch.randint(0, base.vocab_size, (10, BLOCK))
    loss, acc = reconstruction_loss(base, gists, blocks, max_pairs=4, gen=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_gist_similarity_detects_collapse():
    torch.manual_seed(0)
    same = torch.randn(1, 16).expand(20, 16)
    assert float(gist_similarity(same)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(gist_similarity(torch.randn(200, 16)))) < 0.1
    assert float(gist_similarity(torch.randn(1, 16))) == 0.0


def test_config_refuses_bad_content_terms():
    with pytest.raises(ConfigError, match="copy_frac"):
        ObjectiveConfig(copy_frac=1.5)
    with pytest.raises(ConfigError, match="recon_weight"):
        ObjectiveConfig(recon_weight=-1)
    with pytest.raises(ConfigError, match="recon_weight"):
        GistTrainConfig(level=2, context=2048, objective=ObjectiveConfig(recon_weight=1.0))
    ObjectiveConfig(horizon_weight=0.0, dense="none", recon_weight=1.0)  # a recon-only objective is legal
