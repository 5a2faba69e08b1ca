"""Chunked batched scoring: parity with one plain forward of the unmodified base, batching invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.bench.flops import FlopModel
from megacontext.bench.scoring import PENDING_BATCHES, Batcher, Job, new_results
from megacontext.bench.sinks import AttentionSinks, SinksConfig
from megacontext.bench.system import Sample
from megacontext.bench.truncation import FullAttention, Truncation, WindowConfig


def _samples(n=2, length=200, vocab=128):
    g = torch.Generator().manual_seed(0)
    return [Sample(f"s{i}", torch.randint(0, vocab, (length,), generator=g), 1, length) for i in range(n)]


def _reference_nll(base, tokens):
    with torch.no_grad():
        logits = base.model(input_ids=tokens[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="none")


def test_truncation_with_room_for_everything_equals_full_forward(tiny_base):
    samples = _samples()
    scores = Truncation(WindowConfig(chunk=48, batch_tokens=4096)).score(tiny_base, samples, w_max=256)
    for s, sc in zip(samples, scores, strict=True):
        torch.testing.assert_close(sc.nll, _reference_nll(tiny_base, s.tokens), atol=1e-4, rtol=1e-4)
        assert sc.flops > 0


def test_batching_does_not_change_results(tiny_base):
    samples = _samples(3, 150)
    a = Truncation(WindowConfig(chunk=32, batch_tokens=64)).score(tiny_base, samples, w_max=64)
    b = Truncation(WindowConfig(chunk=32, batch_tokens=100_000)).score(tiny_base, samples, w_max=64)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.nll, y.nll, atol=1e-5, rtol=1e-5)
        assert torch.equal(x.top1, y.top1)


def test_small_budget_differs_and_sinks_stay_finite(tiny_base):
    samples = _samples(1, 200)
    ref = _reference_nll(tiny_base, samples[0].tokens)
    trunc = Truncation(WindowConfig(chunk=16)).score(tiny_base, samples, w_max=48)[0].nll
    sinks = AttentionSinks(SinksConfig(chunk=16, sinks=4)).score(tiny_base, samples, w_max=48)[0].nll
    torch.testing.assert_close(trunc[:31], ref[:31], atol=1e-4, rtol=1e-4)  # still whole history there
    assert not torch.allclose(trunc[100:], ref[100:], atol=1e-3)
    assert torch.isfinite(sinks).all()


def test_full_attention_is_nan_past_the_native_window(tiny_base):
    samples = _samples(1, 200)
    nll = FullAttention(native_window=96, cfg=WindowConfig(chunk=32)).score(tiny_base, samples, w_max=40)[0].nll
    assert torch.isfinite(nll[:64]).all()  # chunks whose history + 32 <= 96
    assert torch.isnan(nll[96:]).all()


def test_flop_model_counts_attention_quadratically(tiny_model):
    fm = FlopModel.from_config(tiny_model.config)
    lin = fm.linear_per_token
    assert fm.forward(10, 0) - 10 * lin > 0
    quad = lambda n: fm.forward(n, 0) - n * lin
    assert abs(quad(20) / quad(10) - (20 * 21) / (10 * 11)) < 1e-9
    assert fm.forward(10, 5) - fm.forward(10, 0) == 2 * fm.d_model * fm.vocab * 5


def test_worker_processes_give_the_same_scores_as_in_process(tiny_base):
    """BM25 selection runs in forked workers on the GPU box; many tensors come back from them, which once
    exhausted file descriptors. Results must equal in-process selection."""
    from megacontext.bench.retrieval import BM25Retrieval, RetrievalConfig

    samples = _samples(4, 300)
    one = BM25Retrieval(RetrievalConfig(chunk=16, workers=1)).score(tiny_base, samples, w_max=96)
    two = BM25Retrieval(RetrievalConfig(chunk=16, workers=2)).score(tiny_base, samples, w_max=96)
    for x, y in zip(one, two, strict=True):
        torch.testing.assert_close(x.nll, y.nll, atol=1e-5, rtol=1e-5)


_BASE = []


def _shared_base():
    """One tiny base for all hypothesis examples (function-scoped fixtures do not mix with @given)."""
    if not _BASE:
        from megacontext.base import FrozenBase
        from tests.conftest import tiny_llama

        _BASE.append(FrozenBase(tiny_llama(), name="tiny-llama"))
    return _BASE[0]


@given(st.lists(st.tuples(st.integers(2, 48), st.integers(1, 6), st.booleans()), min_size=1, max_size=12),
       st.integers(8, 160))
@settings(max_examples=15, deadline=None)
def test_batcher_equals_one_forward_per_job_and_bounds_pending_slots(specs, batch_tokens):
    """Jobs of any lengths, chunk sizes and input kinds (ids or ready embeddings): batched results equal one
    plain forward per job, and pending input never exceeds PENDING_BATCHES * batch_tokens slots."""
    base = _shared_base()
    g = torch.Generator().manual_seed(len(specs) * 1000 + batch_tokens)
    jobs, want = [], []
    for i, (length, h, as_embeds) in enumerate(specs):
        h = min(h, length - 1)
        ids = torch.randint(0, 128, (length,), generator=g)
        pos = torch.arange(length) * 3  # gaps, as absolute positions of selected blocks have
        emb = base.embed(ids) if as_embeds else None
        jobs.append(Job(i, 0, ids[-h:] if as_embeds else ids, pos, h, embeds=emb))
        want.append(base.nll(base.embed(ids)[None], pos[None], ids[None, -h:])[0])
    results = new_results([Sample(f"s{i}", torch.zeros(j.h + 1, dtype=torch.long), 1, j.h + 1)
                           for i, j in enumerate(jobs)])
    batcher = Batcher(base, results, batch_tokens, None, _Progress())
    for job in jobs:
        batcher.add(job)
        assert batcher.pending_slots <= PENDING_BATCHES * batch_tokens
        assert batcher.pending_slots == sum(len(v) * k[0] for k, v in batcher.pending.items())
    batcher.flush()
    assert not batcher.pending and batcher.pending_slots == 0
    for res, w in zip(results, want, strict=True):
        torch.testing.assert_close(res.nll, w.detach(), atol=1e-4, rtol=1e-4)


def test_pending_input_stays_bounded_when_every_length_differs(tiny_base):
    """A MegaContext WC has a different length almost every chunk: no group ever fills up by itself, so only
    the global cap keeps pending input (embeddings, on the GPU) bounded."""
    g = torch.Generator().manual_seed(0)
    jobs = [Job(i, 0, torch.randint(0, 128, (n,), generator=g), torch.arange(n), 4)
            for i, n in enumerate(range(20, 60))]
    assert sum(j.length for j in jobs) > 2 * PENDING_BATCHES * 64
    results = new_results([Sample(f"s{i}", torch.zeros(5, dtype=torch.long), 1, 5) for i in range(len(jobs))])
    batcher = Batcher(tiny_base, results, 64, None, _Progress())
    peak = 0
    for job in jobs:
        batcher.add(job)
        peak = max(peak, batcher.pending_slots)
    assert PENDING_BATCHES * 64 - 60 < peak <= PENDING_BATCHES * 64
    batcher.flush()
    assert all(torch.isfinite(r.nll).all() for r in results)


class _Progress:
    def update(self, n):
        pass


def test_job_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="3 embeddings for 4 positions"):
        Job(0, 0, torch.zeros(2, dtype=torch.long), torch.arange(4), 2, embeds=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="h=4"):
        Job(0, 0, torch.zeros(4, dtype=torch.long), torch.arange(4), 4)
