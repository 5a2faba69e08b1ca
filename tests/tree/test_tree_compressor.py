"""Compressor protocol and the mean-pool baseline."""

from __future__ import annotations

import pytest
import torch

from megacontext.tree import Compressor, MeanPoolCompressor


def test_meanpool_is_rescaled_mean_and_versioned(tiny_base):
    comp = MeanPoolCompressor.from_base(tiny_base)
    assert isinstance(comp, Compressor) and comp.d_model == tiny_base.d_model
    assert abs(comp.target_norm - tiny_base.embed_norm) < 1e-5
    ids = torch.randint(0, tiny_base.vocab_size, (5, 32))
    x = comp.embed(ids)  # [5, 32, d]
    assert torch.equal(x, tiny_base.embed(ids))
    g = comp.compress(x, 1)
    assert g.shape == (5, tiny_base.d_model)
    assert torch.allclose(g.norm(dim=-1), torch.full((5,), comp.target_norm), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(g, x.mean(dim=1), dim=-1)
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)
    # rows are independent: batching cannot change a gist
    assert torch.equal(comp.compress(x[2:3], 1), g[2:3])


def test_version_tracks_the_table():
    t = torch.randn(50, 8)
    assert MeanPoolCompressor(t).version == MeanPoolCompressor(t.clone()).version
    assert MeanPoolCompressor(t).version != MeanPoolCompressor(t + 0.1).version
    assert len(MeanPoolCompressor(t).version.encode()) <= 64


def test_meanpool_rejects_bad_shapes():
    comp = MeanPoolCompressor(torch.nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="level"):
        comp.compress(torch.zeros(1, 32, 4), 0)
    with pytest.raises(ValueError, match=r"\[n, 32, 4\]"):
        comp.compress(torch.zeros(1, 16, 4), 1)
    with pytest.raises(ValueError, match="ids"):
        comp.embed(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab"):
        MeanPoolCompressor(torch.zeros(3))
