"""Forced-choice recall (megacontext.demo.recall) and the demo's distractors, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.demo.input import FACTS, distractors, ships_log
from megacontext.demo.recall import ranks_of, read_choices, read_raw


@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=12))
@settings(max_examples=50, deadline=None)
def test_ranks_are_a_permutation_ordered_by_nll(values):
    nll = torch.tensor(values)
    ranks = ranks_of(nll)
    assert sorted(ranks.tolist()) == list(range(1, len(values) + 1))
    order = torch.argsort(ranks)
    assert (nll[order][1:] >= nll[order][:-1]).all()  # rank 1 holds the lowest NLL


def test_batched_scores_match_unbatched_reads(tiny_base):
    """Padding and the repeated cache must not change a candidate's NLL: compare with one plain read each."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 128, (40,), generator=g).tolist()
    cands = [[5], [7, 9, 11], [3, 4], [100, 1, 2, 3]]
    got = read_raw(tiny_base, ctx, cands, n_new=4)
    for i, c in enumerate(cands):
        ids = torch.tensor(ctx + c)
        want = tiny_base.nll(tiny_base.embed(ids)[None], torch.arange(len(ids))[None], torch.tensor([c]))[0].sum()
        assert got.nll[i] == pytest.approx(float(want), rel=1e-4, abs=1e-4)
    assert sorted(got.ranks.tolist()) == [1, 2, 3, 4]
    # the greedy continuation is the plain argmax chain, despite sharing the prefill with the candidates
    seq = list(ctx)
    for _ in range(4):
        logits = tiny_base.forward(tiny_base.embed(torch.tensor(seq))[None], torch.arange(len(seq))[None]).logits
        seq.append(int(logits[0, -1].argmax()))
    assert got.greedy == seq[len(ctx):]


def test_read_choices_matches_engine_peek_nll(tiny_base, tmp_path):
    """Over a MegaContext working context (gists, compact positions) the true answer's score equals the
    engine's own what-if read, so the demo's forced choice measures what the engine would see."""
    from megacontext.api import MegaContext
    from megacontext.runtime.engine import EngineConfig
    from megacontext.wc.working_context import WorkingContextConfig

    g = torch.Generator().manual_seed(1)
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=128, recent_raw=64, position_mode="compact"))
    mc = MegaContext.create(tmp_path / "mc", tiny_base, config=cfg, durable=False)
    mc.ingest(torch.randint(0, 128, (600,), generator=g).tolist())
    engine = mc.engine
    m = engine.materialize()
    assert m.inputs_embeds.shape[0] < 600  # gists are in the window
    cands = [[12, 13], [40], [41, 42, 43]]
    got = read_choices(tiny_base, m.inputs_embeds, m.position_ids, cands)
    for i, c in enumerate(cands):
        assert got.nll[i] == pytest.approx(float(engine.peek_nll(c).sum()), rel=1e-4, abs=1e-4)
    mc.close()


def test_read_choices_rejects_bad_input(tiny_base):
    with pytest.raises(ValueError, match="empty candidate"):
        read_raw(tiny_base, [1, 2, 3], [[4], []])
    with pytest.raises(ValueError, match="non-empty context"):
        read_raw(tiny_base, [], [[4]])


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_distractors_are_same_kind_and_absent(seed):
    text, facts = ships_log(8000, seed=seed)
    assert [f.answer for f in facts] == [a for _, a in FACTS]
    for f in facts:
        alts = distractors(f.answer, text, 7, seed=seed)
        assert len(set(alts)) == 7 and f.answer not in alts
        assert f.answer.strip(" .") in text  # the true answer is in the text; the alternatives are not
        assert all(a.strip(" .").lower() not in text.lower() for a in alts)
        assert all(a.endswith(".") and a.startswith(" ") for a in alts)
        if f.answer.strip(" .").isdigit():
            assert all(a.strip(" .").isdigit() and len(a) == len(f.answer) for a in alts)
        assert alts == distractors(f.answer, text, 7, seed=seed)  # deterministic
    with pytest.raises(ValueError, match="no alternatives"):
        distractors(" Neptune.", text)
