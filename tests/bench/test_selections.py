"""Context selection rules of the window, sink and BM25 baselines (pure functions, property-tested)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.bench.retrieval import RetrievalConfig, bm25_selection
from megacontext.bench.sinks import sink_selection
from megacontext.bench.system import place
from megacontext.bench.truncation import FullAttention, recent


def _history(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 600), budget=st.integers(8, 300), sinks=st.integers(1, 6),
       mode=st.sampled_from(["compact", "absolute"]))
def test_sinks_keep_first_and_recent_within_budget(n, budget, sinks, mode):
    h = _history(n)
    sel = sink_selection(h, budget, sinks, mode)
    assert sel.ids.shape[0] == min(n, budget)
    assert torch.equal(sel.ids[-min(n, budget - sinks):], h[-min(n, budget - sinks):])
    if n > budget:
        assert torch.equal(sel.ids[:sinks], h[:sinks])
    if mode == "compact":
        assert torch.equal(sel.positions, torch.arange(sel.ids.shape[0]))
        assert sel.next_position == sel.ids.shape[0]
    else:  # each id sits at its stream offset
        assert torch.equal(h[sel.positions], sel.ids)
        assert sel.next_position == n


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 1500), budget=st.integers(64, 400), frac=st.floats(0.0, 1.0))
def test_bm25_selection_is_a_time_ordered_subset_within_budget(n, budget, frac):
    h = _history(n, seed=n)
    cfg = RetrievalConfig(recent_fraction=frac, query_tokens=16, positions="absolute")
    sel = bm25_selection(h, budget, cfg)
    assert sel.ids.shape[0] <= budget
    assert torch.equal(h[sel.positions], sel.ids)  # every id at its true offset
    assert bool((sel.positions[1:] > sel.positions[:-1]).all())  # time order, no duplicates
    assert sel.positions[-1] == n - 1 and sel.next_position == n  # the recent window is always there


def test_bm25_retrieves_the_block_that_matches_the_query():
    rng = np.random.default_rng(0)
    h = torch.as_tensor(rng.integers(100, 5000, size=4096))
    planted = torch.arange(10, 42)  # a 32-token block of rare ids, far back
    h[1024:1056] = planted
    h[-16:] = planted[:16]  # the query repeats part of it
    sel = bm25_selection(h, 256, RetrievalConfig(recent_fraction=0.5, query_tokens=16))
    assert 1024 in sel.positions.tolist()
    assert torch.equal(sel.ids[sel.positions == 1024], planted[:1])


def test_truncation_and_full_attention():
    h = _history(80)
    sel = recent(h, 20)
    assert torch.equal(sel.ids, h[-20:]) and torch.equal(sel.positions, torch.arange(20))
    full = FullAttention(native_window=64)
    full.chunk = 8
    assert full.select(h[:56], budget=4).ids.shape[0] == 56  # ignores the budget while it fits
    assert full.select(h[:57], budget=4) is None  # 57 + 8 > 64: not applicable


def test_place_rejects_unknown_mode():
    with pytest.raises(ValueError, match="position mode 'weird'"):
        place([torch.arange(3)], [0], "weird")  # type: ignore[arg-type]
