"""raw_first_tiling: legal, within budget, and keeping the most raw text any split could keep."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.lod import BLOCK, cost_tensor
from megacontext.wc.tiling import (
    BudgetError,
    EntryState,
    check_tiling,
    collapse_by_recency,
    min_cost,
    min_w_max,
    raw_first_tiling,
)
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig


def _cost(state, n):
    return int(cost_tensor(state.levels).sum()) + n % BLOCK


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40_000), recent=st.sampled_from([0, 32, 64, 128, 200]), slack=st.integers(0, 3000))
def test_raw_first_is_legal_fitting_and_maximally_raw(n, recent, slack):
    w_max = max(min_cost(n, recent), min_w_max(recent)) + slack
    state = raw_first_tiling(n, recent, w_max)
    check_tiling(state, n, recent, w_max)
    raw = int((state.levels == 0).sum())
    # one more raw block means splitting one block earlier: that must not fit (or nothing is left to split)
    if raw < n // BLOCK:
        s = n // BLOCK - raw - 1
        assert s // BLOCK + s % BLOCK + BLOCK * (n // BLOCK - s) + n % BLOCK > w_max
    # the levels read oldest to newest never get finer then coarser: LOD2* LOD1* LOD0*
    assert torch.all(state.levels[1:] <= state.levels[:-1])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2048, 40_000), w_max=st.integers(300, 3000))
def test_raw_first_keeps_at_least_as_much_raw_text_as_spread(n, w_max):
    recent = 128
    if min_cost(n, recent) > w_max:
        return
    blocks = n // BLOCK
    zeros = torch.zeros(blocks, dtype=torch.long)
    full = EntryState(zeros, torch.arange(blocks), zeros.clone(), zeros.clone())
    spread = collapse_by_recency(full, n, recent, w_max, step=0)
    raw_first = raw_first_tiling(n, recent, w_max)
    assert int((raw_first.levels == 0).sum()) >= int((spread.levels == 0).sum())
    assert _cost(raw_first, n) <= w_max


def test_raw_first_on_a_long_history_is_mostly_raw():
    n, w_max = 32_768, 1024
    state = raw_first_tiling(n, 128, w_max)
    assert int((state.levels == 0).sum()) * BLOCK > 0.8 * w_max  # vs 4 raw blocks under "spread"
    with pytest.raises(BudgetError, match="does not fit w_max=100"):
        raw_first_tiling(n, 128, 100)


def test_working_context_sync_uses_the_configured_rule():
    cfg = WorkingContextConfig(w_max=1024, recent_raw=128, recency="raw_first")
    wc = WorkingContext(cfg)
    for n in range(0, 20_000, 777):
        wc.sync(n)
        assert wc.cost <= 1024
    ref = raw_first_tiling(wc.num_tokens, 128, 1024)
    assert torch.equal(wc.levels, ref.levels) and torch.equal(wc.indices, ref.indices)
    with pytest.raises(ValueError, match="recency='newest'"):
        WorkingContextConfig(recency="newest")
