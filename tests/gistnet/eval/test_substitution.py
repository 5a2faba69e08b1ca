"""Gist evaluation: parity of every variant with direct base-model calls, batching invariance, copy probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megacontext.core.config import ConfigError
from megacontext.gistnet.eval.substitution import (
    GistEvalConfig,
    Setting,
    compress,
    copy_blocks,
    copy_windows,
    score_windows,
    setting_nlls,
    stacked_prefix_nll,
    window_nll,
)
from megacontext.tree.compressor import MeanPoolCompressor

SMALL = dict(context=128, horizon=8, gisted=(64, 96), batch_size=2, n_boot=50, cram={"windows": 0},
             recon={"cram_blocks": 2, "cram_steps": 2})


class LinearCompressor(torch.nn.Module):
    """A stand-in compressor (random linear map of the block mean): cheap, deterministic, not mean pooling."""

    def __init__(self, d: int):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x, level):
        return self.lin(x.mean(1)) * level


def reference_nll(model, tokens, horizon, start=0, prefix=None, prefix_pos=None):
    """Direct HF-model NLL of the horizon: embeddings and positions built by hand, no MegaContext code. The
    explicit mask keeps transformers from reading position jumps as packed-sequence boundaries."""
    emb = model.get_input_embeddings()(tokens[:, start:])
    pos = torch.arange(start, tokens.shape[1]).expand(tokens.shape[0], -1)
    if prefix is not None:
        emb = torch.cat([prefix, emb], 1)
        pos = torch.cat([prefix_pos.expand(tokens.shape[0], -1), pos], 1)
    mask = torch.ones(emb.shape[:2], dtype=torch.long)
    logits = model(inputs_embeds=emb, position_ids=pos, attention_mask=mask).logits[:, -horizon - 1:-1]
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, -horizon:], reduction="none")


@pytest.fixture
def windows():
    return torch.randint(0, 128, (3, 136), generator=torch.Generator().manual_seed(0))


def test_config_validation_names_bad_values():
    with pytest.raises(ConfigError, match="gisted=100"):
        GistEvalConfig(gisted=(100,))
    with pytest.raises(ConfigError, match="gisted=1024"):
        GistEvalConfig(gisted=(1024,))
    with pytest.raises(ConfigError, match="lod2_recent=0"):
        GistEvalConfig(lod2_recent=0)
    cfg = GistEvalConfig(lod2=True)
    assert [s.name for s in cfg.settings()] == ["lod1-512of1024", "lod1-896of1024", "lod2-1024of1152"]
    assert cfg.window == 1152 + 64
    assert GistEvalConfig.from_dict({"cram": {"steps": 5}}).cram.steps == 5


def test_positions_are_span_centres():
    assert Setting(1, 96, 128).positions("cpu").tolist() == [16, 48, 80]
    assert Setting(2, 1024, 1056).positions("cpu").tolist() == [512]


def test_compress_levels(tiny_base):
    mp = MeanPoolCompressor.from_base(tiny_base)
    toks = torch.randint(0, 128, (2, 1024))
    lod1 = compress(tiny_base, mp.compress, toks, 1)
    lod2 = compress(tiny_base, mp.compress, toks, 2)
    assert lod1.shape == (2, 32, tiny_base.d_model) and lod2.shape == (2, 1, tiny_base.d_model)
    torch.testing.assert_close(lod2[:, 0], mp.compress(lod1, 2))
    torch.testing.assert_close(lod1.norm(dim=-1), torch.full((2, 32), tiny_base.embed_norm))


def test_every_variant_matches_the_unmodified_base(tiny_base, tiny_model, windows):
    comp = LinearCompressor(tiny_base.d_model)
    s = Setting(1, 64, 128)
    with torch.no_grad():
        out = setting_nlls(tiny_base, {"gist": comp}, windows, 8, s)
        pos = s.positions("cpu")
        prefix = comp(tiny_model.get_input_embeddings()(windows[:, :64]).reshape(-1, 32, tiny_base.d_model), 1)
        ref = {"raw": reference_nll(tiny_model, windows, 8),
               "drop": reference_nll(tiny_model, windows, 8, 64),
               "gist": reference_nll(tiny_model, windows, 8, 64, prefix.view(3, 2, -1), pos)}
    assert set(out) == {"raw", "drop", "gist"}
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out["gist"], out["drop"])  # the prefix really reaches the model


def test_stacked_forward_equals_separate_forwards(tiny_base, windows):
    prefixes = {k: torch.randn(3, 2, tiny_base.d_model, generator=torch.Generator().manual_seed(i))
                for i, k in enumerate(("a", "b", "c"))}
    pos = Setting(1, 64, 128).positions("cpu")
    with torch.no_grad():
        stacked = stacked_prefix_nll(tiny_base, windows, 8, 64, prefixes, pos)
        for k, p in prefixes.items():
            torch.testing.assert_close(stacked[k], window_nll(tiny_base, windows, 8, 64, p, pos), atol=1e-5, rtol=1e-5)


def test_copy_blocks_lie_in_the_gisted_region_and_are_seeded():
    s = Setting(1, 96, 128)
    b = copy_blocks(s, 500, seed=0)
    assert b.min() == 0 and b.max() == 2
    assert torch.equal(b, copy_blocks(s, 500, seed=0)) and not torch.equal(b, copy_blocks(s, 500, seed=1))
    assert copy_blocks(Setting(2, 1024, 1152), 500, 0).max() == 31


def test_copy_windows_append_the_chosen_gisted_block():
    toks = torch.arange(2 * 136).view(2, 136)
    s = Setting(1, 96, 128)
    out = copy_windows(toks, s, torch.tensor([0, 2]))
    assert out.shape == (2, 160)
    assert torch.equal(out[:, :128], toks[:, :128])
    assert torch.equal(out[0, 128:], toks[0, 0:32]) and torch.equal(out[1, 128:], toks[1, 64:96])


def test_scores_do_not_depend_on_batch_size(tiny_base, windows):
    mp = MeanPoolCompressor.from_base(tiny_base).compress
    comp = LinearCompressor(tiny_base.d_model)
    a = score_windows(tiny_base, windows, GistEvalConfig(**{**SMALL, "batch_size": 1, "gisted": (64,)}), comp, mp)
    b = score_windows(tiny_base, windows, GistEvalConfig(**{**SMALL, "batch_size": 2, "gisted": (64,)}), comp, mp)
    assert set(a) == {"horizon", "copy", "recon"}
    assert set(a["horizon"]) == {"lod1-64of128"}
    assert set(a["horizon"]["lod1-64of128"]) == {"raw", "drop", "gist", "gist_wrong", "meanpool", "window_index"}
    for p in a:
        for s in a[p]:
            for v in a[p][s]:
                assert a[p][s][v].shape == ((2,) if v.startswith("cram") else (3,))
                np.testing.assert_allclose(a[p][s][v], b[p][s][v], rtol=1e-5, atol=1e-5)


def test_copy_probe_scores_the_repeat_without_its_first_token(tiny_base, tiny_model, windows):
    mp = MeanPoolCompressor.from_base(tiny_base).compress
    cfg = GistEvalConfig(**{**SMALL, "gisted": (64, 96)})
    scores = score_windows(tiny_base, windows, cfg, None, mp)
    # raw is shared by the LOD1 settings (same tokens); drop differs (less context survives)
    np.testing.assert_array_equal(scores["horizon"]["lod1-64of128"]["raw"], scores["horizon"]["lod1-96of128"]["raw"])
    assert not np.allclose(scores["horizon"]["lod1-64of128"]["drop"], scores["horizon"]["lod1-96of128"]["drop"])
    got = scores["copy"]["lod1-96of128"]
    blocks = copy_blocks(Setting(1, 96, 128), 3, cfg.seed)
    cw = copy_windows(windows[:, -136:], Setting(1, 96, 128), blocks)
    with torch.no_grad():
        ref = reference_nll(tiny_model, cw, 32)[:, 1:].mean(-1).numpy()
    np.testing.assert_allclose(got["raw"], ref, rtol=1e-5, atol=1e-5)
    assert "gist" not in got  # no GistNet given: baselines only
    np.testing.assert_array_equal(got["window_index"], np.arange(3))


@pytest.mark.parametrize("tokens", [torch.zeros(2, 100, dtype=torch.long), torch.zeros(136, dtype=torch.long)])
def test_windows_of_the_wrong_shape_are_refused(tiny_base, tokens):
    mp = MeanPoolCompressor.from_base(tiny_base).compress
    with pytest.raises(ValueError, match=r"\[N, >= 136\]"):
        score_windows(tiny_base, tokens, GistEvalConfig(**SMALL), None, mp)


def test_lod2_setting_adds_gist_lod1(tiny_base):
    mp = MeanPoolCompressor.from_base(tiny_base).compress
    cfg = GistEvalConfig(context=64, horizon=4, gisted=(32,), lod2=True, lod2_recent=32, copy_probe=False,
                         cram={"windows": 0})
    toks = torch.randint(0, 128, (1, cfg.window), generator=torch.Generator().manual_seed(2))
    got = score_windows(tiny_base, toks, cfg, LinearCompressor(tiny_base.d_model), mp)["horizon"]
    assert set(got) == {"lod1-32of64", "lod2-1024of1056"}
    assert set(got["lod2-1024of1056"]) == {"raw", "drop", "gist", "meanpool", "gist_lod1", "window_index"}
