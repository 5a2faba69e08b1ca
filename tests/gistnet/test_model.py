"""GistNet model: shapes, norm invariant, mean-pool init, levels, RoPE order sensitivity, persistence."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.base import FrozenBase
from megacontext.core.checkpoint import CheckpointError
from megacontext.core.config import ConfigError
from megacontext.gistnet.compressor import GistCompressor
from megacontext.gistnet.model import GistNet, GistNetConfig
from tests.conftest import tiny_llama

D = 32
CFG = GistNetConfig(layers=1, heads=2)


def _randomise(net: GistNet, seed: int = 0) -> GistNet:
    """Move off the mean-pool init so the trunk actually contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "log_gain":
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return net


def _mean_pool(x: torch.Tensor, norm: float) -> torch.Tensor:
    m = x.mean(1)
    return m * (norm / m.norm(dim=-1, keepdim=True))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), level=st.sampled_from([1, 2]), norm=st.floats(0.05, 5.0), shared=st.booleans())
def test_output_shape_and_norm(n, level, norm, shared):
    net = _randomise(GistNet(CFG.replace(shared_levels=shared), D, embed_norm=norm))
    y = net(torch.randn(n, 32, D), level)
    assert y.shape == (n, D)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((n,), norm), rtol=1e-4, atol=1e-5)


def test_untrained_net_is_mean_pooling():
    net = GistNet(GistNetConfig(layers=2, heads=4), D, embed_norm=0.7)
    x = torch.randn(5, 32, D)
    torch.testing.assert_close(net(x, 1), _mean_pool(x, 0.7), rtol=1e-5, atol=1e-6)


def test_order_matters_after_training_but_not_at_init():
    x = torch.randn(3, 32, D)
    rev = x.flip(1)
    init = GistNet(CFG, D)
    torch.testing.assert_close(init(x), init(rev), rtol=1e-5, atol=1e-6)
    net = _randomise(GistNet(CFG, D))
    assert not torch.allclose(net(x), net(rev), atol=1e-4)  # RoPE makes the slots' order visible


@pytest.mark.parametrize("shared", [True, False])
def test_level_tensor_matches_int_levels(shared):
    net = _randomise(GistNet(CFG.replace(shared_levels=shared), D))
    x = torch.randn(4, 32, D)
    levels = torch.tensor([1, 2, 2, 1])
    mixed = net(x, levels)
    torch.testing.assert_close(mixed[levels == 1], net(x[levels == 1], 1))
    torch.testing.assert_close(mixed[levels == 2], net(x[levels == 2], 2))
    assert not torch.allclose(net(x, 1), net(x, 2), atol=1e-4)  # the level changes the gist


def test_rows_are_independent():
    net = _randomise(GistNet(CFG, D))
    x = torch.randn(6, 32, D)
    torch.testing.assert_close(net(x)[2:4], net(x[2:4]), rtol=1e-5, atol=1e-6)


def test_learned_gain_rescales_norm():
    net = GistNet(CFG.replace(learn_gain=True), D, embed_norm=1.0)
    with torch.no_grad():
        net.log_gain.fill_(0.5)
    y = net(torch.randn(2, 32, D), 1)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((2,), float(torch.tensor(0.5).exp())))


def test_bad_inputs_raise_clear_errors():
    net = GistNet(CFG, D)
    with pytest.raises(ValueError, match=r"\[n, 32, 32\].*\(2, 31, 32\)"):
        net(torch.randn(2, 31, D))
    with pytest.raises(ValueError, match="level=3"):
        net(torch.randn(2, 32, D), 3)
    with pytest.raises(ValueError, match="one per input row"):
        net(torch.randn(2, 32, D), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="d_model=0"):
        GistNet(CFG, 0)
    with pytest.raises(ConfigError, match="layers=-1"):
        GistNetConfig(layers=-1)


def test_width_comes_from_d_model():
    assert GistNetConfig(heads=4).width(384) == 384
    assert GistNetConfig(heads=4).width(32) == 32
    assert GistNetConfig(heads=4, width_mult=0.5).width(384) == 192
    assert GistNetConfig(heads=3).width(100) % 6 == 0  # head_dim stays even for RoPE


def test_save_load_roundtrip_and_refusals(tmp_path):
    base = FrozenBase(tiny_llama(), name="tiny")
    net = _randomise(GistNet(CFG.replace(shared_levels=False), base.d_model, base.embed_norm))
    net.save(tmp_path / "ck", base, extra={"step": 7})
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["kind"] == "gistnet" and meta["step"] == 7 and meta["weights_hash"] == net.weights_hash()
    loaded = GistNet.load(tmp_path / "ck", base)
    x = torch.randn(3, 32, base.d_model)
    torch.testing.assert_close(loaded(x, 2), net(x, 2))
    assert loaded.weights_hash() == net.weights_hash()

    other = FrozenBase(tiny_llama(seed=1), name="other")  # same shapes, other weights
    with pytest.raises(CheckpointError, match="fingerprint"):
        GistNet.load(tmp_path / "ck", other)


def test_bf16_save_is_half_size_and_close(tmp_path):
    base = FrozenBase(tiny_llama(), name="tiny")
    net = _randomise(GistNet(CFG, base.d_model, base.embed_norm))
    net.save(tmp_path / "f32", base)
    net.save(tmp_path / "b16", base, dtype=torch.bfloat16)
    s32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    s16 = (tmp_path / "b16" / "model.safetensors").stat().st_size
    assert s16 < 0.6 * s32
    x = torch.randn(4, 32, base.d_model)
    torch.testing.assert_close(GistNet.load(tmp_path / "b16", base)(x), net(x), atol=0.05 * base.embed_norm, rtol=0)


def test_gist_compressor_protocol():
    from megacontext.tree.compressor import Compressor, gists_of_blocks, gists_of_groups

    base = FrozenBase(tiny_llama(), name="tiny")
    net = _randomise(GistNet(CFG, base.d_model, base.embed_norm))
    comp = GistCompressor(net, base)
    assert isinstance(comp, Compressor) and comp.d_model == base.d_model
    assert comp.version.startswith("gistnet-v1:") and len(comp.version.encode()) <= 64
    ids = torch.randint(0, base.vocab_size, (64, 32))
    g1 = gists_of_blocks(comp, ids)
    torch.testing.assert_close(g1, net(base.embed(ids), 1).detach())
    g2 = gists_of_groups(comp, g1)
    assert g2.shape == (2, base.d_model)
    meanpool = GistCompressor(net, base, level2="meanpool")
    assert meanpool.version != comp.version
    torch.testing.assert_close(meanpool.compress(g1.view(2, 32, -1), 2), _mean_pool(g1.view(2, 32, -1),
                                                                                    base.embed_norm))
    _randomise(net, seed=5)
    assert GistCompressor(net, base).version != comp.version  # new weights, new version

