"""Variants, counterfactual labels (parity with a direct forward), cache reproducibility and resume."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacontext.lensnet.labels import LabelConfig, LabelSet, counterfactual_utilities, generate_labels
from megacontext.lensnet.views import (
    DocSource,
    DocView,
    actionable,
    collapse_variants,
    expand_variants,
    sample_tiling,
)
from megacontext.tree.compressor import MeanPoolCompressor
from megacontext.wc.materialize import materialize_tiling
from megacontext.wc.tiling import apply_actions, check_tiling


@pytest.fixture
def doc(tiny_base):
    ids = torch.randint(1, 128, (3000,), generator=torch.Generator().manual_seed(3))
    return DocView.build(tiny_base, MeanPoolCompressor.from_base(tiny_base), ids)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 1000), st.sampled_from([128, 256, 512]), st.integers(0, 4), st.integers(0, 4))
def test_variants_equal_rebuilt_tilings(tiny_base, seed, w_max, n_exp, n_col):
    ids = torch.randint(1, 128, (2200,), generator=torch.Generator().manual_seed(seed))
    view = DocView.build(tiny_base, MeanPoolCompressor.from_base(tiny_base), ids)
    t = 2048
    state = sample_tiling(t, w_max, 64, n_exp, n_col, torch.Generator().manual_seed(seed))
    check_tiling(state, t, 64, w_max)
    exp_m, col_m = actionable(state, t, 64)
    for mask_kind, fn in (("expand", expand_variants), ("collapse", collapse_variants)):
        which = (exp_m if mask_kind == "expand" else col_m).nonzero().squeeze(1)[:5]
        if which.numel() == 0:
            continue
        got = fn(view, state, which)
        for k, e in enumerate(which.tolist()):
            m = torch.zeros(len(state), dtype=torch.bool)
            m[e] = True
            none = torch.zeros_like(m)
            s2 = apply_actions(state, m if mask_kind == "expand" else none, m if mask_kind == "collapse" else none, 0)
            ref = view.entry_slots(s2.levels, s2.indices)
            for a, b in zip(got, ref, strict=True):
                assert torch.equal(a[k], b)


def test_slots_match_working_context_materialisation(tiny_base, doc):
    """Our slot encoding and the WC's materialiser agree on embeddings and positions."""
    state = sample_tiling(2048, 256, 64, 2, 2, torch.Generator().manual_seed(0))
    tok, rows, pos = doc.entry_slots(state.levels, state.indices)
    mine = doc.embed_slots(tiny_base, tok, rows)
    ref = materialize_tiling(state.levels, state.indices, 2048, DocSource(doc, 2048), tiny_base.embed, "absolute")
    torch.testing.assert_close(mine.float(), ref.inputs_embeds.float())
    assert torch.equal(pos, ref.position_ids)


def test_utilities_match_direct_forward(tiny_base, doc):
    t, h = 2048, 16
    state = sample_tiling(t, 256, 64, 1, 1, torch.Generator().manual_seed(1))
    exp_m, col_m = actionable(state, t, 64)
    e_idx, c_idx = exp_m.nonzero().squeeze(1)[:3], col_m.nonzero().squeeze(1)[:3]
    gain, loss, nll0 = counterfactual_utilities(tiny_base, doc, state, t, h, e_idx, c_idx, batch_size=2)

    def direct(s):
        tok, rows, pos = doc.entry_slots(s.levels, s.indices)
        emb = torch.cat([doc.embed_slots(tiny_base, tok, rows), tiny_base.embed(doc.ids[t:t + h])])[None]
        p = torch.cat([pos, torch.arange(t, t + h)])[None]
        return float(tiny_base.nll(emb, p, doc.ids[t:t + h][None]).mean())

    assert abs(direct(state) - float(nll0)) < 1e-5
    for e in e_idx.tolist():
        m = torch.zeros(len(state), dtype=torch.bool)
        m[e] = True
        s2 = apply_actions(state, m, torch.zeros_like(m), 0)
        assert abs(float(gain[e]) - (float(nll0) - direct(s2))) < 1e-4
    assert int((~gain.isnan()).sum()) == e_idx.numel() and int((~loss.isnan()).sum()) == c_idx.numel()


def _cfg(**kw):
    base = dict(budgets=(256,), min_history=1024, contexts=3, shard_size=2, max_labels=6, horizon=8,
                tail_tokens=8, recent_raw=32, batch_size=4, seed=5)
    base.update(kw)
    return LabelConfig(**base)


def test_cache_reproducible_resumable_and_guarded(tiny_base, tmp_path):
    comp = MeanPoolCompressor.from_base(tiny_base)
    docs = [torch.randint(1, 128, (1400,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = generate_labels(tiny_base, comp, docs, _cfg(), tmp_path / "a")
    assert stats["contexts"] == 3 and stats["labels"] > 0 and stats["labels_per_s"] > 0
    generate_labels(tiny_base, comp, docs, _cfg(), tmp_path / "b")
    a, b = LabelSet.load(tmp_path / "a"), LabelSet.load(tmp_path / "b")
    assert len(a) == len(b) == 3
    for x, y in zip(a.ctx, b.ctx, strict=True):
        assert torch.equal(x["levels"], y["levels"]) and torch.equal(x["gain"].nan_to_num(9), y["gain"].nan_to_num(9))
    # resume: a finished shard is not recomputed
    (tmp_path / "a" / "shard_00001.safetensors").unlink()
    again = generate_labels(tiny_base, comp, docs, _cfg(), tmp_path / "a")
    assert again["contexts"] == 1
    with pytest.raises(ValueError, match="different settings"):
        generate_labels(tiny_base, comp, docs, _cfg(horizon=4), tmp_path / "a")
    batch = a.collate([0, 1, 2])
    assert batch["entries"].shape[:2] == batch["mask"].shape and batch["tail"].shape == (3, 8)


def test_too_short_documents_are_refused(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="long enough"):
        generate_labels(tiny_base, MeanPoolCompressor.from_base(tiny_base), [torch.arange(100)], _cfg(), tmp_path)
