"""Cramming: optimisation lowers the KL to the raw model, windows stay independent, the base stays frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megacontext.core.config import ConfigError
from megacontext.gistnet.eval.cramming import CramConfig, cram, cram_kl, teacher_logprobs
from megacontext.gistnet.eval.substitution import GistEvalConfig, Setting, compress, cram_scores
from megacontext.tree.compressor import MeanPoolCompressor


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (2, 72), generator=torch.Generator().manual_seed(0))


def _init(base, tokens, g=64):
    return compress(base, MeanPoolCompressor.from_base(base).compress, tokens[:, :g], 1)


def test_teacher_is_the_raw_model(tiny_base, tiny_model, tokens):
    got = teacher_logprobs(tiny_base, tokens, 64)  # predictions of tokens 64..71
    with torch.no_grad():
        ref = F.log_softmax(tiny_model(input_ids=tokens).logits[:, 63:71], -1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cramming_lowers_kl_and_keeps_base_frozen(tiny_base, tokens):
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    pos = Setting(1, 64, 64).positions("cpu")
    vecs, kl0, kl1 = cram(tiny_base, tokens, 64, _init(tiny_base, tokens), pos, steps=25, lr=0.05)
    assert vecs.shape == (2, 2, tiny_base.d_model) and not vecs.requires_grad
    assert (kl1 < 0.7 * kl0).all(), (kl0, kl1)
    with torch.no_grad():
        torch.testing.assert_close(cram_kl(tiny_base, tokens, 64, vecs, pos, teacher_logprobs(tiny_base, tokens, 64)),
                                   kl1)
    for k, v in tiny_base.model.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert v.grad is None


def test_windows_are_crammed_independently(tiny_base, tokens):
    pos = Setting(1, 64, 64).positions("cpu")
    init = _init(tiny_base, tokens)
    both, _, _ = cram(tiny_base, tokens, 64, init, pos, steps=5, lr=0.05)
    alone, _, _ = cram(tiny_base, tokens[1:], 64, init[1:], pos, steps=5, lr=0.05)
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=1e-4)


def test_cram_scores_report_all_variants(tiny_base):
    cfg = GistEvalConfig(context=64, horizon=8, gisted=(32,), cram={"windows": 2, "steps": 3, "batch": 2})
    wins = torch.randint(0, 128, (2, cfg.window), generator=torch.Generator().manual_seed(3))
    out = cram_scores(tiny_base, wins, cfg, None, MeanPoolCompressor.from_base(tiny_base).compress)
    cols = out["lod1-32of64"]
    assert set(cols) == {"raw", "drop", "meanpool", "cram", "init_kl", "cram_kl"}
    assert all(v.shape == (2,) and np.isfinite(v).all() for v in cols.values())
    assert (cols["cram_kl"] <= cols["init_kl"]).all()


def test_config_validation():
    with pytest.raises(ConfigError, match="cram.steps=0"):
        CramConfig(steps=0)
    with pytest.raises(ConfigError, match="cram.init='best'"):
        CramConfig(init="best")
    with pytest.raises(ValueError, match="steps=0"):
        cram(None, torch.zeros(1, 64, dtype=torch.long), 32, torch.zeros(1, 1, 4), torch.zeros(1), steps=0)


def test_cram_subset_is_a_seeded_spread_out_sample():
    from megacontext.gistnet.eval.substitution import cram_subset

    a = cram_subset(1000, 32, seed=0)
    assert a.shape == (32,) and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 32
    assert torch.equal(a, cram_subset(1000, 32, seed=0)) and not torch.equal(a, cram_subset(1000, 32, seed=1))
    assert a.max() > 500  # not just the first windows (samplers may return them in document order)
    assert cram_subset(5, 32, seed=0).tolist() == [0, 1, 2, 3, 4]
