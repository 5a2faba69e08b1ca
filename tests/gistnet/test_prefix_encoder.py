"""GistNet with encoder='base': a trainable copy of the base's first layers (gistnet.prefix_encoder)."""

from __future__ import annotations

import pytest
import torch

from megacontext.base import FrozenBase
from megacontext.gistnet.model import GistNet, GistNetConfig
from megacontext.gistnet.train import GistTrainConfig, train
from tests.conftest import tiny_llama

CFG = GistNetConfig(encoder="base", layers=1)


@pytest.fixture
def base():
    return FrozenBase(tiny_llama(layers=2), name="tiny")


def _net(base, cfg=CFG) -> GistNet:
    net = GistNet(cfg, base.d_model, base.embed_norm, base_config=base.config)
    net.init_encoder_from(base)
    return net


def test_untrained_net_is_mean_pooling_and_copies_the_base_layers(base):
    net = _net(base)
    x = base.embed(torch.randint(0, base.vocab_size, (4, 32)))  # [4, 32, d]
    g = net(x, 1)
    mean = x.float().mean(1)
    assert torch.allclose(g, mean * (base.embed_norm / mean.norm(dim=-1, keepdim=True)), atol=1e-5)
    src, dst = base.model.model.layers[0], net.trunks[0].body.layers[0]
    assert torch.equal(src.self_attn.q_proj.weight, dst.self_attn.q_proj.weight)
    assert len(net.trunks[0].body.layers) == 1  # a prefix of the base's 2 layers
    assert net.trunks[0].body.get_input_embeddings().weight.shape[0] == 1  # no vocabulary table copied


def test_gist_depends_only_on_its_own_block(base):
    net = _net(base)
    with torch.no_grad():
        net.trunks[0].out.weight.normal_()  # leave the mean-pooling start, so the body matters
    x = base.embed(torch.randint(0, base.vocab_size, (3, 32)))
    alone = net(x[:1], 1)
    together = net(x, 1)[:1]
    other = x.clone()
    other[1:] = base.embed(torch.randint(0, base.vocab_size, (2, 32)))
    assert torch.allclose(alone, together, atol=1e-5) and torch.allclose(net(other, 1)[:1], alone, atol=1e-5)
    assert not torch.allclose(net(x, 1), net(x, 2))  # the level vector reaches the slot


def test_training_moves_the_copy_not_the_base_and_checkpoints_round_trip(base, tmp_path):
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    cfg = GistTrainConfig(out=str(tmp_path / "run"), context=96, horizon=16, batch_size=2, steps=3, log_every=1,
                          val_every=0, save_every=0, warmup_lr_steps=1, curriculum_steps=2, model=CFG,
                          encoder_lr_mult=0.5)
    train(cfg, base)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    net = GistNet.load(tmp_path / "run", base)
    assert net.cfg.encoder == "base"
    moved = net.trunks[0].body.layers[0].mlp.up_proj.weight
    assert not torch.equal(moved.cpu(), base.model.model.layers[0].mlp.up_proj.weight.cpu())
    groups = net.param_groups(0.5)
    assert [g["lr_mult"] for g in groups] == [1.0, 0.5]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    x = base.embed(torch.randint(0, base.vocab_size, (2, 32)))
    copy = GistNet.load(tmp_path / "run", base)
    assert torch.equal(copy(x, 1), net(x, 1))


def test_slots_net_keeps_one_parameter_group(base):
    net = GistNet(GistNetConfig(layers=1, heads=2), base.d_model, base.embed_norm)
    groups = net.param_groups(0.1)
    assert len(groups) == 1 and groups[0]["params"] == list(net.parameters())


def test_bad_settings_name_the_value(base):
    with pytest.raises(ValueError, match="base_config"):
        GistNet(CFG, base.d_model, base.embed_norm)
    with pytest.raises(ValueError, match="layers=3"):
        GistNet(GistNetConfig(encoder="base", layers=3), base.d_model, base.embed_norm, base_config=base.config)
    with pytest.raises(Exception, match="encoder='nope'"):
        GistNetConfig(encoder="nope")
    with pytest.raises(ValueError, match="encoder='slots'"):
        GistNet(GistNetConfig(layers=1, heads=2), base.d_model, base.embed_norm).init_encoder_from(base)
