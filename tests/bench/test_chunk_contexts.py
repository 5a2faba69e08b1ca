"""Chunk contexts for MegaContext bench systems: batched LensNet scoring, job layout, budget."""

from __future__ import annotations

import pytest
import torch

from megacontext.bench.chunk_contexts import BatchedLens, ChunkBuild, PrefixHistory, build_wave
from megacontext.bench.system import Sample
from megacontext.focus import FocusState, RecencyFocus
from megacontext.focus.lens import LensPolicy
from megacontext.lensnet.model import LensNet, LensNetConfig
from megacontext.tree import InMemoryHistory, MeanPoolCompressor
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig


@pytest.fixture
def history(tiny_base):
    g = torch.Generator().manual_seed(3)
    return InMemoryHistory(torch.randint(0, 128, (1500,), generator=g), MeanPoolCompressor.from_base(tiny_base))


def _lens(tiny_base, lexical: int = 0):
    torch.manual_seed(0)
    net = LensNet(LensNetConfig(layers=1, tail_tokens=8, lexical_features=lexical), tiny_base.d_model)
    torch.nn.init.normal_(net.head_out.weight, std=0.5)  # untrained heads score 0: make the scores differ
    return LensPolicy(net, tiny_base)


@pytest.mark.parametrize("lexical", [0, 3])
def test_batched_lens_equals_one_call_per_working_context(tiny_base, history, lexical):
    """Padding (entries on the right, short tails on the left) must not change any entry's score; a net with
    the lexical feature gets the same features (and multi-level targets) batched as one call at a time."""
    policy = _lens(tiny_base, lexical)
    wcs, states = [], []
    for n, w_max in ((5, 160), (200, 160), (700, 160), (1400, 300)):  # 0..many entries, short and full tails
        wc = WorkingContext(WorkingContextConfig(w_max=w_max, recent_raw=64))
        wc.sync(n)
        if len(wc):
            wcs.append(wc)
            states.append(FocusState(PrefixHistory(history, n), n, history.tokens(max(n - 8, 0), n), "generate"))
    assert len({len(wc) for wc in wcs}) == len(wcs) >= 3
    batched = BatchedLens(policy)
    got = batched.scores_batch(wcs, states, history)
    for i, (wc, st, g) in enumerate(zip(wcs, states, got, strict=True)):
        want = policy.scores(wc, st)
        assert g.shape == want.shape and want.abs().max() > 1e-3
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
        if lexical:
            assert torch.equal(batched.last_targets_batch[i], policy.last_targets)
    with pytest.raises(ValueError, match="no entries"):
        BatchedLens(policy).scores_batch([WorkingContext(WorkingContextConfig(w_max=160, recent_raw=64))],
                                         [states[0]], history)


@pytest.mark.parametrize("mode", ["absolute", "compact"])
def test_jobs_hold_the_working_context_then_the_chunk(tiny_base, history, mode):
    sample = Sample("s", history.tokens(0, 1500), 1, 1500)
    bounds = [(1, 33), (600, 632), (1400, 1420)]
    build = ChunkBuild(recent_raw=64, position_mode=mode, rounds=2, query_tokens=16)
    jobs = build_wave(tiny_base, history, sample, 7, bounds, 200, build, RecencyFocus, fresh_policy=False)
    for job, (s, e) in zip(jobs, bounds, strict=True):
        h = e - s
        assert job.sample == 7 and job.offset == s - 1 and job.h == h
        assert torch.equal(job.ids, sample.tokens[s:e])
        assert job.length <= 200 and job.embeds.shape == (job.length, tiny_base.d_model)
        torch.testing.assert_close(job.embeds[-h:], tiny_base.embed(sample.tokens[s:e]))
        t = job.length - h
        first = s if mode == "absolute" else t
        assert torch.equal(job.positions[-h:], torch.arange(first, first + h))
    assert jobs[0].length == 1 + 32  # the whole one-token prefix fits
    assert jobs[2].length > 150  # a 1400-token prefix fills most of the 180-slot WC budget
    if mode == "compact":
        assert torch.equal(jobs[2].positions, torch.arange(jobs[2].length))


def test_prefix_history_hides_the_future(tiny_base):
    hist = InMemoryHistory(torch.arange(100) % 128, MeanPoolCompressor.from_base(tiny_base))
    view = PrefixHistory(hist, 70)
    assert view.num_entries(1) == 2 and view.gists(1, 0, 2).shape[0] == 2
    with pytest.raises(ValueError, match="not complete"):
        view.gists(1, 0, 3)
    with pytest.raises(ValueError, match="past the prefix"):
        view.tokens(60, 71)
    with pytest.raises(IndexError, match="outside"):
        view.gather_gists(1, torch.tensor([2]))
