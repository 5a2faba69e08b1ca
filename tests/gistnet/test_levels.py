"""LOD1/LOD2 pairing: stacked LOD2 checkpoints, level-2 mode of LOD1-only checkpoints, and the compressor."""

from __future__ import annotations

import pytest
import torch

from megacontext.base import FrozenBase
from megacontext.core.checkpoint import CheckpointError
from megacontext.gistnet.compressor import GistCompressor
from megacontext.gistnet.levels import TwoLevelGist, level2_mode, load_lod2
from megacontext.gistnet.model import GistNet, GistNetConfig
from tests.conftest import tiny_llama

CFG = GistNetConfig(layers=1, heads=2)


@pytest.fixture(scope="module")
def base():
    return FrozenBase(tiny_llama(), name="tiny")


def _net(base, seed):
    torch.manual_seed(seed)
    net = GistNet(CFG, base.d_model, base.embed_norm)
    with torch.no_grad():
        for t in net.trunks:
            t.out.weight.normal_(std=0.3)  # off the mean-pool start, so nets differ
    return net


def _mean(x, norm):
    m = x.mean(1)
    return m * (norm / m.norm(dim=-1, keepdim=True))


@pytest.fixture
def ckpts(base, tmp_path):
    lod1, lod2, other = _net(base, 0), _net(base, 1), _net(base, 2)
    lod1.save(tmp_path / "lod1", base, extra={"levels": [1]})
    lod2.save(tmp_path / "lod2", base, extra={"levels": [2], "lod1_weights_hash": lod1.weights_hash()})
    other.save(tmp_path / "joint", base, extra={"train_config": {"level": 2}})
    return tmp_path, lod1, lod2, other


def test_level2_mode_follows_what_was_trained(ckpts):
    d, *_ = ckpts
    assert level2_mode(d / "lod1") == "meanpool"  # untrained level-2 path is never used
    assert level2_mode(d / "joint") == "gistnet"  # joint training (older checkpoints: from train_config)
    assert level2_mode(d / "lod2") == "meanpool"  # a stacked LOD2 net is not a LOD1 net


def test_pair_dispatches_levels(base, ckpts):
    d, lod1, lod2, _ = ckpts
    pair = TwoLevelGist.load(d / "lod1", base, d / "lod2")
    x = torch.randn(3, 32, base.d_model)
    torch.testing.assert_close(pair(x, 1), lod1(x, 1))
    torch.testing.assert_close(pair(x, 2), lod2(x, 2))
    alone = TwoLevelGist.load(d / "lod1", base)
    torch.testing.assert_close(alone(x, 2), _mean(x, base.embed_norm))
    torch.testing.assert_close(pair(x, 3), _mean(x, base.embed_norm))  # no net for LOD3: mean pooling
    with pytest.raises(ValueError, match="level=9"):
        pair(x, 9)
    upper = TwoLevelGist(lod1, lod2, upper={3: lod2})  # a net for LOD3 is used and named in the version tag
    torch.testing.assert_close(upper(x, 3), lod2(x, 2))
    assert upper.level2_tag().endswith(f":l3-{lod2.weights_hash()[:8]}") and pair.level2_tag() == \
        f":l2-{lod2.weights_hash()[:8]}"


def test_lod2_is_refused_on_another_lod1(base, ckpts):
    d, _, _, other = ckpts
    with pytest.raises(CheckpointError, match="trained on LOD1 gists of weights"):
        load_lod2(d / "lod2", other, base)
    with pytest.raises(CheckpointError, match="not level 2"):
        load_lod2(d / "lod1", other, base)
    with pytest.raises(CheckpointError, match="records no lod1_weights_hash"):
        load_lod2(d / "joint", other, base)


def test_compressor_versions_name_the_level2_source(base, ckpts):
    d, lod1, lod2, _ = ckpts
    versions = {GistCompressor.load(str(d / "lod1"), base).version,
                GistCompressor.load(str(d / "lod1"), base, lod2=str(d / "lod2")).version,
                GistCompressor(lod1, base, level2="gistnet").version}
    assert len(versions) == 3 and all(len(v.encode()) <= 64 for v in versions)
    comp = GistCompressor.load(str(d / "lod1"), base, lod2=str(d / "lod2"))
    g1 = comp.compress(comp.embed(torch.randint(0, base.vocab_size, (64, 32))), 1)
    torch.testing.assert_close(comp.compress(g1.view(2, 32, -1), 2), lod2(g1.view(2, 32, -1), 2))
