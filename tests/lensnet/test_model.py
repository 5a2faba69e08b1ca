"""LensNet network: shapes, neutrality at init, padding and permutation invariance, size, persistence."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.checkpoint import CheckpointError
from megacontext.lensnet.model import LensNet, LensNetConfig, age_encoding


def _inputs(b=2, e=7, t=5, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, e, d, generator=g), torch.randint(0, 3, (b, e), generator=g),
            torch.rand(b, e, generator=g) * 5000, torch.ones(b, e, dtype=torch.bool), torch.randn(b, t, d, generator=g))


def _trained_like(d=32):
    torch.manual_seed(0)
    net = LensNet(LensNetConfig(width_mult=1.0), d)
    torch.nn.init.normal_(net.head_out.weight, std=0.5)  # make the head non-neutral
    return net.eval()


def test_untrained_is_neutral_and_shapes():
    net = LensNet(LensNetConfig(), 32)
    s = net(*_inputs())
    assert s.shape == (2, 7) and s.dtype == torch.float32
    assert torch.count_nonzero(s) == 0


def test_size_derived_from_base_is_small():
    n = LensNet(LensNetConfig(), 384).num_params()
    assert 1_000_000 <= n <= 2_500_000, n


def test_padding_does_not_change_real_scores():
    net = _trained_like()
    x, lv, age, mask, tail = _inputs(b=1, e=6)
    ref = net(x, lv, age, mask, tail)
    pad = 3
    x2 = torch.cat([x, torch.randn(1, pad, 32)], 1)
    lv2 = torch.cat([lv, torch.zeros(1, pad, dtype=torch.long)], 1)
    age2 = torch.cat([age, torch.zeros(1, pad)], 1)
    mask2 = torch.cat([mask, torch.zeros(1, pad, dtype=torch.bool)], 1)
    out = net(x2, lv2, age2, mask2, tail)
    torch.testing.assert_close(out[:, :6], ref, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(out[:, 6:]) == 0


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_permutation_equivariant(seed):
    """Non-causal: entry order carries no information beyond the age features."""
    net = _trained_like()
    x, lv, age, mask, tail = _inputs(b=1, e=9, seed=seed)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
    a = net(x, lv, age, mask, tail)[0]
    b = net(x[:, perm], lv[:, perm], age[:, perm], mask[:, perm], tail)[0]
    torch.testing.assert_close(b, a[perm], atol=1e-5, rtol=1e-4)


def test_tail_changes_scores_and_gradients_flow():
    net = _trained_like()
    x, lv, age, mask, tail = _inputs()
    a = net(x, lv, age, mask, tail)
    b = net(x, lv, age, mask, tail + 1.0)
    assert not torch.allclose(a, b)
    a.sum().backward()
    assert net.entry_in.weight.grad is not None and net.entry_in.weight.grad.abs().sum() > 0


def test_age_encoding_range():
    f = age_encoding(torch.tensor([0.0, 1.0, 1e9]), 4)
    assert f.shape == (3, 9) and float(f.abs().max()) <= 1.0 + 1e-6


def test_bad_shapes_name_the_problem():
    net = LensNet(LensNetConfig(), 32)
    x, lv, age, mask, tail = _inputs()
    with pytest.raises(ValueError, match="entries must be"):
        net(x[..., :16], lv, age, mask, tail)
    with pytest.raises(ValueError, match="levels/ages/entry_mask"):
        net(x, lv[:, :3], age, mask, tail)


def test_save_load_roundtrip_and_fingerprint(tmp_path, tiny_base):
    net = _trained_like(d=tiny_base.d_model)
    net.save(tmp_path / "ck", tiny_base, extra={"target_scale": 0.5})
    loaded, meta = LensNet.load(tmp_path / "ck", tiny_base)
    assert meta["target_scale"] == 0.5
    inp = _inputs(d=tiny_base.d_model)
    torch.testing.assert_close(loaded(*inp), net(*inp))
    tiny_base.fingerprint = "0" * 16
    with pytest.raises(CheckpointError, match="fingerprint"):
        LensNet.load(tmp_path / "ck", tiny_base)


def test_config_validation_names_value():
    with pytest.raises(ValueError, match="layers=0"):
        LensNetConfig(layers=0)
