"""Multi-level moves: a strong gist with a target block goes straight down to raw, within budget and caps."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.lod import BLOCK, entry_bounds
from megacontext.wc.allocator import AllocatorConfig
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig, check_invariants


def _targets(wc: WorkingContext, g: torch.Generator, frac: float) -> torch.Tensor:
    """A random block inside each entry's span for a fraction of the entries, else -1 (some outside, too)."""
    start, end = entry_bounds(wc.levels, wc.indices)
    r = torch.rand(len(wc), generator=g)
    blk = start // BLOCK + (r * ((end - start) // BLOCK).float()).long()
    blk = torch.where(torch.rand(len(wc), generator=g) < 0.1, blk + 10_000, blk)  # outside: must be ignored
    return torch.where(torch.rand(len(wc), generator=g) < frac, blk, torch.full_like(blk, -1))


@settings(max_examples=12, deadline=None)
@given(n0=st.integers(2_000, 80_000), w_max=st.integers(300, 2048), seed=st.integers(0, 2**16),
       n_diff=st.integers(0, 40), cooldown=st.integers(0, 4), scale=st.sampled_from([0.5, 2.0, 5.0]))
def test_deep_moves_keep_every_invariant(n0, w_max, seed, n_diff, cooldown, scale):
    cfg = WorkingContextConfig(w_max=w_max, recent_raw=64)
    try:
        wc = WorkingContext.assemble(n0, cfg)
    except ValueError:
        return
    acfg = AllocatorConfig(n_diff=n_diff, cooldown=cooldown, tau_deep=0.5)
    g = torch.Generator().manual_seed(seed)
    for step in range(60):
        if step % 10 == 9:
            try:
                wc.sync(wc.num_tokens + int(torch.randint(0, 300, (1,), generator=g)))
            except ValueError:
                return
        cost = wc.cost
        tel = wc.refocus(torch.randn(len(wc), generator=g) * scale, acfg, targets=_targets(wc, g, 0.7))
        check_invariants(wc)  # complete, block-aligned tiling; protected tail raw; cost <= w_max
        acts = int(tel.n_expand) + int(tel.n_deep) + int(tel.n_collapse)
        assert acts <= n_diff
        assert wc.cost == cost + 31 * (int(tel.n_expand) + int(tel.n_deep) - int(tel.n_collapse))


def test_lod2_goes_to_raw_in_one_step():
    wc = WorkingContext.assemble(40_000, WorkingContextConfig(w_max=1024, recent_raw=64))
    lod2 = (wc.levels == 2).nonzero().flatten()
    e = int(lod2[0])
    target_block = int(wc.indices[e]) * 32 + 7
    scores = torch.zeros(len(wc))
    scores[e] = 3.0
    targets = torch.full((len(wc),), -1, dtype=torch.long)
    targets[e] = target_block
    acfg = AllocatorConfig(tau_deep=1.0)
    tel = wc.refocus(scores, acfg, targets=targets)
    check_invariants(wc)
    assert int(tel.n_expand) == 1 and int(tel.n_deep) == 1
    raw = wc.indices[wc.levels == 0]
    assert target_block in raw.tolist()
    # below the deep threshold: one level only
    wc2 = WorkingContext.assemble(40_000, WorkingContextConfig(w_max=1024, recent_raw=64))
    scores[e] = 0.8
    tel = wc2.refocus(scores, acfg, targets=targets)
    assert int(tel.n_expand) == 1 and int(tel.n_deep) == 0 and target_block not in wc2.indices[wc2.levels == 0]


@settings(max_examples=15, deadline=None)
@given(n0=st.integers(2_000, 60_000), seed=st.integers(0, 2**16))
def test_disabled_or_no_targets_is_the_single_level_step(n0, seed):
    cfgs = WorkingContextConfig(w_max=1024, recent_raw=64)
    g = torch.Generator().manual_seed(seed)
    a, b, c = (WorkingContext.assemble(n0, cfgs) for _ in range(3))
    for _ in range(10):
        scores = torch.randn(len(a), generator=g) * 3
        t = _targets(a, g, 1.0)
        a.refocus(scores, AllocatorConfig())
        b.refocus(scores, AllocatorConfig(deep=False), targets=t)
        c.refocus(scores, AllocatorConfig(), targets=None)
        for x in (b, c):
            assert torch.equal(a.levels, x.levels) and torch.equal(a.indices, x.indices)


def test_deep_move_respects_n_diff_and_budget():
    cfg = WorkingContextConfig(w_max=1024, recent_raw=64)
    wc = WorkingContext.assemble(60_000, cfg)
    lod2 = (wc.levels == 2).nonzero().flatten()
    scores = torch.full((len(wc),), -0.05)
    scores[lod2] = 5.0
    targets = torch.full((len(wc),), -1, dtype=torch.long)
    targets[lod2] = wc.indices[lod2] * 32
    tel = wc.refocus(scores, AllocatorConfig(n_diff=5, tau_deep=1.0), targets=targets)
    check_invariants(wc)
    assert int(tel.n_expand) + int(tel.n_deep) + int(tel.n_collapse) <= 5
