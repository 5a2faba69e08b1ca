"""Reconstruction probe: parity with a hand-built base call, the wrong-gist control, the crammed bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megacontext.base import FrozenBase
from megacontext.core.lod import BLOCK
from megacontext.gistnet.eval.reconstruction import (
    ReconConfig,
    cram_vectors,
    probe_blocks,
    recon_scores,
    summarise_recon,
)
from megacontext.gistnet.eval.substitution import GistEvalConfig, Setting, setting_nlls
from megacontext.gistnet.objective import reconstruction_logits
from megacontext.tree.compressor import MeanPoolCompressor
from tests.conftest import tiny_llama


class Shift(torch.nn.Module):
    """A deterministic stand-in compressor: block mean plus a fixed offset."""

    def forward(self, x, level):
        return x.mean(1) + 0.1 * level


def _base():
    return FrozenBase(tiny_llama(bos_token_id=3), name="tiny")


def test_reconstruction_logits_match_a_hand_built_call():
    base = _base()
    vecs = torch.randn(2, base.d_model)
    blocks = torch.randint(0, base.vocab_size, (2, BLOCK))
    got = reconstruction_logits(base, vecs, blocks)
    m = base.model
    emb = torch.cat([m.get_input_embeddings()(torch.tensor([[3], [3]])), vecs[:, None],
                     m.get_input_embeddings()(blocks)], 1)
    ref = m(inputs_embeds=emb, position_ids=torch.arange(34).expand(2, -1),
            attention_mask=torch.ones(2, 34, dtype=torch.long)).logits[:, 1:33]
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5)


def test_probe_blocks_are_blocks_of_the_context():
    windows = torch.arange(5 * 200).view(5, 200)
    blocks = probe_blocks(windows, 128, seed=0)
    assert blocks.shape == (5, BLOCK)
    for r in range(5):
        start = int(blocks[r, 0]) - 200 * r
        assert start % BLOCK == 0 and start < 128
        assert torch.equal(blocks[r], windows[r, start:start + BLOCK])
    assert torch.equal(blocks, probe_blocks(windows, 128, seed=0))


def test_recon_scores_columns_and_wrong_gist_is_a_rolled_gist():
    base = _base()
    blocks = torch.randint(0, base.vocab_size, (5, BLOCK), generator=torch.Generator().manual_seed(0))
    mp = MeanPoolCompressor.from_base(base).compress
    cols = recon_scores(base, blocks, ReconConfig(cram_blocks=0, batch=2), Shift(), mp)
    assert set(cols) == {f"{v}_{m}" for v in ("gist", "gist_wrong", "meanpool", "none") for m in ("acc", "nll")}
    gists = Shift()(base.embed(blocks), 1)
    wrong = reconstruction_logits(base, gists.roll(1, 0), blocks)
    nll = F.cross_entropy(wrong.transpose(1, 2), blocks, reduction="none").mean(-1)
    np.testing.assert_allclose(cols["gist_wrong_nll"], nll.detach().numpy(), rtol=1e-5)
    assert ((cols["gist_acc"] >= 0) & (cols["gist_acc"] <= 1)).all()


def test_crammed_vectors_reconstruct_better_than_their_start():
    base = _base()
    blocks = torch.randint(0, base.vocab_size, (3, BLOCK), generator=torch.Generator().manual_seed(1))
    init = torch.zeros(3, base.d_model)

    def nll(v):
        logits = reconstruction_logits(base, v, blocks)
        return float(F.cross_entropy(logits.transpose(1, 2), blocks))

    vecs = cram_vectors(base, blocks, init, steps=30, lr=0.05)
    assert nll(vecs) < nll(init) - 0.01


def test_summary_pairs_the_crammed_rows():
    cols = {"gist_acc": np.array([0.1, 0.2, 0.3, 0.4]), "gist_nll": np.ones(4),
            "cram_acc": np.array([0.9, 0.8]), "cram_nll": np.zeros(2), "cram_rows": np.array([1, 3])}
    out = summarise_recon(cols, n_boot=20, seed=0)
    assert out["cram"]["acc"]["n"] == 2
    assert out["gist_on_cram_rows"]["acc"]["value"] == pytest.approx(0.3)  # mean of rows 1 and 3


def test_wrong_gist_control_reads_the_other_windows_gists():
    base = _base()
    tokens = torch.randint(0, base.vocab_size, (3, 72), generator=torch.Generator().manual_seed(2))
    s = Setting(1, 32, 64)
    comps = {"gist": Shift()}
    other = tokens.roll(1, 0)
    out = setting_nlls(base, comps, tokens, 8, s, wrong_tokens=other)
    # parity: the control equals the gist variant computed with the other windows' gists spliced in by hand
    prefix = Shift()(base.embed(other[:, :32]).reshape(3, 1, BLOCK, -1).reshape(3, BLOCK, -1), 1)[:, None]
    hand = setting_nlls(base, {}, tokens, 8, s, extra_prefixes={"x": prefix})["x"]
    torch.testing.assert_close(out["gist_wrong"], hand)
    assert not torch.allclose(out["gist_wrong"], out["gist"])
    assert GistEvalConfig().wrong_gist
