"""Unbounded depth: levels above LOD2 appear only when LOD0-2 no longer fit, every history up to the reach is
tiled, and the reach (one closed formula) is exact."""

from __future__ import annotations

import pytest
import torch

from megacontext.core.lod import BLOCK
from megacontext.wc import BudgetError, WorkingContext, WorkingContextConfig, check_invariants
from megacontext.wc.tiling import first_overflow, min_cost, raw_first_tiling, reach


@pytest.mark.parametrize("recent, extra", [(0, 0), (32, 5), (64, 31), (32, 32), (128, 40), (32, 63)])
def test_first_overflow_is_exact(recent, extra):
    w_max = recent + 62 + extra
    first = first_overflow(w_max, recent)
    assert min_cost(first, recent) > w_max
    step = max(first // 60_000, 1)  # exhaustive for small reaches, a dense sample (plus the end) otherwise
    assert all(min_cost(n, recent) <= w_max for n in [*range(0, first, step), *range(max(first - 2048, 0), first)])


def test_two_levels_reproduce_the_old_reach_and_depth_extends_it():
    assert reach(156, 32, max_level=2) == 65_536  # the brick point of issue 14's reproduction at this budget
    assert reach(156, 32) > 2_000_000
    assert reach(1024, 128) > 10**14  # the default budget: effectively unbounded


def test_sync_far_past_the_two_level_reach_adds_levels_only_when_needed():
    cfg = WorkingContextConfig(w_max=156, recent_raw=32)
    wc = WorkingContext(cfg)
    first_seen: dict[int, int] = {}
    for i, n in enumerate(range(0, 2_000_000, 3001)):
        wc.sync(n)
        top = int(wc.levels.max()) if len(wc) else 0
        first_seen.setdefault(top, n)
        if i % 30 == 0:
            check_invariants(wc)
    check_invariants(wc)
    assert wc.cost <= 156 and sorted(first_seen)[-1] == 4
    assert first_seen[3] > reach(156, 32, max_level=2) and first_seen[4] > reach(156, 32, max_level=3)


def test_raw_first_keeps_two_levels_while_they_fit():
    n = 60_000
    two = raw_first_tiling(n, 128, 1024)
    assert int(two.levels.max()) == 2
    deep = raw_first_tiling(300_000, 32, 156)
    assert int(deep.levels.max()) == 3
    assert int((deep.levels == 0).sum()) * BLOCK >= 32
    with pytest.raises(BudgetError, match="does not fit"):
        raw_first_tiling(n, 32, 94, max_level=2)


def test_collapse_and_expand_across_levels():
    wc = WorkingContext.assemble(200_000, WorkingContextConfig(w_max=156, recent_raw=32))
    lod3 = int((wc.levels == 3).nonzero()[0])
    # make room: the WC is nearly full; a collapse of an LOD1 run pays for one expansion
    wc2 = WorkingContext.assemble(200_000, WorkingContextConfig(w_max=400, recent_raw=32))
    assert int(wc2.levels.max()) == 2  # a larger budget needs no LOD3 for the same history
    before = wc.state
    if wc.cost + 31 <= wc.cfg.w_max:
        wc.expand(lod3)
        assert wc.levels[lod3:lod3 + 32].tolist() == [2] * 32
        check_invariants(wc)
        wc.collapse(lod3 + 5)
        assert torch.equal(wc.levels, before.levels) and torch.equal(wc.indices, before.indices)
