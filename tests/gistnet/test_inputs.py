"""What GistNet reads at LOD1: token embeddings, or the frozen base model's hidden states of each block."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.base import FrozenBase
from megacontext.core.config import ConfigError
from megacontext.gistnet.compressor import GistCompressor
from megacontext.gistnet.eval.substitution import compress as eval_compress
from megacontext.gistnet.model import GistNet, GistNetConfig, unwrap
from megacontext.gistnet.objective import ObjectiveConfig, make_prefix, substitution_loss
from megacontext.lensnet.views import DocView
from megacontext.tree.compressor import gists_of_blocks
from tests.conftest import tiny_llama

HIDDEN = GistNetConfig(layers=1, heads=2, inputs="hidden", input_layer=-1)


@pytest.fixture(scope="module")
def base():
    return FrozenBase(tiny_llama(layers=3), name="tiny")


def _hf_block_states(base, ids, layer):
    """Reference: the unmodified HF model reading each block alone, standard call."""
    with torch.no_grad():
        out = base.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[layer]


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_hidden_inputs_match_the_base_model(base, layer):
    net = GistNet(HIDDEN.replace(input_layer=layer), base.d_model, base.embed_norm)
    ids = torch.randint(0, base.vocab_size, (5, 32))
    torch.testing.assert_close(net.lod1_inputs(base, ids, chunk=2), _hf_block_states(base, ids, layer),
                               rtol=1e-4, atol=1e-5)


def test_embedding_inputs_are_token_embeddings(base):
    net = GistNet(HIDDEN.replace(inputs="embeddings"), base.d_model, base.embed_norm)
    ids = torch.randint(0, base.vocab_size, (3, 32))
    torch.testing.assert_close(net.lod1_inputs(base, ids), base.embed(ids))


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 6), which=st.integers(0, 5), seed=st.integers(0, 1000))
def test_hidden_gist_depends_only_on_its_own_block(base, n, which, seed):
    net = GistNet(HIDDEN, base.d_model, base.embed_norm)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.vocab_size, (n, 32), generator=gen)
    which %= n
    other = ids.clone()
    other[which] = torch.randint(0, base.vocab_size, (32,), generator=gen)
    a, b = net(net.lod1_inputs(base, ids)), net(net.lod1_inputs(base, other))
    keep = torch.arange(n) != which
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-6)


def test_bad_input_settings_are_named(base):
    with pytest.raises(ConfigError, match="inputs='tokens'"):
        GistNetConfig(inputs="tokens")
    net = GistNet(HIDDEN.replace(input_layer=9), base.d_model, base.embed_norm)
    with pytest.raises(ValueError, match="input_layer=9"):
        net.lod1_inputs(base, torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be \[n, 32\]"):
        net.lod1_inputs(base, torch.zeros(1, 31, dtype=torch.long))


def test_every_consumer_reads_the_same_inputs(base):
    """Training prefix, tree compressor, eval and LensNet views all make identical hidden-input gists."""
    torch.manual_seed(0)
    net = GistNet(HIDDEN, base.d_model, base.embed_norm)
    with torch.no_grad():
        net.trunks[0].out.weight.normal_(std=0.2)  # leave the mean-pool start
    tokens = torch.randint(0, base.vocab_size, (1, 64 + 32))
    blocks = tokens[0, :64].view(2, 32)
    expected = net(net.lod1_inputs(base, blocks), 1)  # [2, d]
    prefix, _, _ = make_prefix(tokens, base, net, 2)
    torch.testing.assert_close(prefix[0], expected)
    comp = GistCompressor(net, base)
    assert comp.version.endswith(":hidden-1")
    torch.testing.assert_close(gists_of_blocks(comp, blocks), expected)
    torch.testing.assert_close(eval_compress(base, net, tokens[:, :64], 1)[0], expected)
    torch.testing.assert_close(DocView.build(base, comp, tokens[0, :64]).lod1, expected)


def test_hidden_inputs_train_through_the_objective(base):
    torch.manual_seed(0)
    net = GistNet(HIDDEN, base.d_model, base.embed_norm)
    tokens = torch.randint(0, base.vocab_size, (2, 128))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = substitution_loss(net, base, tokens, 16, 2, ObjectiveConfig(dense_tokens=32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(p.grad is None for p in base.model.parameters())


def test_unwrap_finds_the_net_inside_wrappers():
    net = GistNet(HIDDEN, 32)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(Wrapper(net))) is net
    with pytest.raises(TypeError, match="Linear is not a GistNet"):
        unwrap(torch.nn.Linear(2, 2))
