"""Working context: restoring from a saved state (from_state) and the minimum budget a config may ask for."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.config import ConfigError
from megacontext.wc.allocator import AllocatorConfig
from megacontext.wc.tiling import EntryState, min_cost, min_w_max, reach
from megacontext.wc.working_context import (
    InvariantError,
    WorkingContext,
    WorkingContextConfig,
    WorkingContextError,
    check_invariants,
)

SPAN2 = 1024


def _focused_wc(seed: int = 0) -> WorkingContext:
    """A WC whose tiling mixes all three levels and non-trivial born/origin bookkeeping."""
    wc = WorkingContext.assemble(40_000, WorkingContextConfig(w_max=512, recent_raw=64))
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        wc.refocus(torch.randn(len(wc), generator=g) * 2, AllocatorConfig(n_diff=8))
    return wc


def _assert_same(a: WorkingContext, b: WorkingContext) -> None:
    for x, y in zip(a.state.fields(), b.state.fields(), strict=True):
        assert torch.equal(x, y)
    assert (a.num_tokens, a.step, a.cost, a.cfg) == (b.num_tokens, b.step, b.cost, b.cfg)


def test_round_trip_through_state_gives_an_equal_wc():
    wc = _focused_wc()
    assert set(wc.levels.tolist()) == {0, 1, 2} and wc.step == 6
    saved = EntryState(*(t.clone() for t in wc.state.fields()))
    back = WorkingContext.from_state(wc.cfg, saved, wc.num_tokens, wc.step)
    _assert_same(back, wc)
    g = torch.Generator().manual_seed(3)  # the restored WC keeps evolving exactly like the original
    scores = torch.randn(len(wc), generator=g)
    wc.refocus(scores)
    back.refocus(scores)
    wc.sync(wc.num_tokens + 100)
    back.sync(back.num_tokens + 100)
    _assert_same(back, wc)


def test_from_state_accepts_plain_tensors_of_other_dtypes():
    wc = _focused_wc()
    ints = EntryState(*(t.to(torch.int32) for t in wc.state.fields()))
    back = WorkingContext.from_state(wc.cfg, ints, wc.num_tokens, wc.step)
    assert back.levels.dtype == torch.long
    _assert_same(back, wc)


def _corrupt(wc: WorkingContext, field: str, entry: int, value: int) -> EntryState:
    t = getattr(wc.state, field).clone()
    t[entry] = value
    return dataclasses.replace(wc.state, **{field: t})


@pytest.mark.parametrize("how, match", [
    ("gap", "do not abut"),
    ("protected", "overlaps the protected recent 64 tokens"),
    ("level", "levels must lie in 0..8"),
    ("length", "the history has"),
    ("budget", "exceeds w_max"),
])
def test_corrupted_state_raises_the_specific_invariant(how, match):
    wc = _focused_wc()
    n = wc.num_tokens
    state = wc.state
    if how == "gap":
        gist = int((wc.levels == 1).nonzero()[0])
        state = _corrupt(wc, "indices", gist, int(wc.indices[gist]) + 1)
    elif how == "protected":
        state = _corrupt(wc, "levels", len(wc) - 1, 1)  # the newest block as a gist
    elif how == "level":
        state = _corrupt(wc, "levels", 0, 9)
    elif how == "length":
        n += 64  # the tiling no longer covers the history it claims
    cfg = wc.cfg
    if how == "budget":  # a legal tiling, restored under a smaller budget than the one it was built for
        cfg = WorkingContextConfig(w_max=wc.cost - 1, recent_raw=64)
        match = f"cost {wc.cost} exceeds w_max={wc.cost - 1}"
    with pytest.raises(InvariantError, match=match):
        WorkingContext.from_state(cfg, state, n, 0)


def test_from_state_rejects_negative_counters():
    with pytest.raises(WorkingContextError, match="step=-1"):
        WorkingContext.from_state(WorkingContextConfig(), EntryState.empty(), 0, -1)


# ---------------------------------------------------------------------- minimum budget
def test_minimum_budget_is_tight_and_named():
    # the reported case: accepted by the old rule (w_max >= recent_raw + 32), failed after 314 tokens
    assert min_cost(314, 64) > 96
    with pytest.raises(ConfigError, match=r"w_max=96 .*recent_raw=64.*w_max >= 126"):
        WorkingContextConfig(w_max=96, recent_raw=64)
    for recent in (0, 1, 31, 32, 33, 64, 100, 128, 500, 2000):
        m = min_w_max(recent)
        assert reach(m, recent) >= SPAN2
        WorkingContextConfig(w_max=m, recent_raw=recent)
        with pytest.raises(ConfigError, match=f"w_max >= {m}"):
            WorkingContextConfig(w_max=m - 1, recent_raw=recent)


@settings(max_examples=30, deadline=None)
@given(recent=st.integers(0, 3000))
def test_minimum_budget_is_the_worst_min_cost_before_steady_growth(recent):
    window = recent + 32 + SPAN2  # protected region complete, then one full LOD2 span of older blocks
    costs = [min_cost(n, recent) for n in range(window + 1)]
    assert max(costs) == min_w_max(recent)  # so w_max = min - 1 fails inside the window
    assert reach(min_w_max(recent), recent) >= SPAN2


@settings(max_examples=20, deadline=None)
@given(recent=st.integers(0, 300), extra=st.integers(0, 40), seed=st.integers(0, 2**16))  # reach <= ~360k tokens
def test_accepted_config_survives_a_stream_up_to_its_reach(recent, extra, seed):
    cfg = WorkingContextConfig(w_max=min_w_max(recent) + extra, recent_raw=recent)
    top = reach(cfg.w_max, cfg.recent_raw)
    assert top >= SPAN2
    g = torch.Generator().manual_seed(seed)
    # coarse random strides to the last span, then small odd-sized steps through it (where cost peaks:
    # every tail length and protected-boundary offset gets a chance), ending exactly at the reach
    coarse = torch.randint(1, max(top // 16, 2), (64,), generator=g).cumsum(0)
    fine = top - SPAN2 + torch.randint(1, 64, (64,), generator=g).cumsum(0)
    lengths = sorted({n for n in coarse.tolist() + fine.tolist() if n < top} | {top})
    wc = WorkingContext(cfg)
    for n in lengths:
        wc.sync(n)  # never BudgetError
        assert wc.cost <= cfg.w_max
    assert wc.num_tokens == top
    check_invariants(wc)


@settings(max_examples=4, deadline=None)
@given(recent=st.integers(0, 200))
def test_minimum_config_survives_every_length_of_its_first_span(recent):
    wc = WorkingContext(WorkingContextConfig(w_max=min_w_max(recent), recent_raw=recent))
    for n in range(1, SPAN2 + 1):  # token by token: every tail length and protected-boundary offset
        wc.sync(n)
    check_invariants(wc)
