"""Focus allocator: legality and budget under random scores, thresholds, priority, swaps, cooldown, telemetry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.config import ConfigError
from megacontext.core.lod import BLOCK, span_tensor
from megacontext.wc.allocator import AllocatorConfig
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig, check_invariants


@pytest.fixture(autouse=True)
def _one_thread():
    """Allocator tensors are tiny; on a loaded 2-core box OpenMP spin-waits dominate, so run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _block_levels(wc: WorkingContext) -> np.ndarray:
    """Level of the entry covering each complete block: [num_blocks]."""
    return torch.repeat_interleave(wc.levels, span_tensor(wc.levels) // BLOCK).numpy()


@settings(max_examples=12, deadline=None)
@given(n0=st.integers(0, 80_000), w_max=st.integers(256, 2048), recent=st.integers(0, 200),
       seed=st.integers(0, 2**16), n_diff=st.integers(0, 40), cooldown=st.integers(0, 5),
       scale=st.sampled_from([0.05, 1.0, 5.0]))
def test_random_scores_keep_every_invariant(n0, w_max, recent, seed, n_diff, cooldown, scale):
    cfg = WorkingContextConfig(w_max=max(w_max, recent + 3 * BLOCK), recent_raw=recent)
    wc = WorkingContext.assemble(n0 if cfg.w_max >= 2 + n0 // 1024 + recent + 64 else 0, cfg)
    acfg = AllocatorConfig(n_diff=n_diff, cooldown=cooldown)
    g = torch.Generator().manual_seed(seed)
    for step in range(150):  # x 12 examples: ~2,000 allocator steps with streaming in between
        if step % 10 == 9:
            try:
                wc.sync(wc.num_tokens + int(torch.randint(0, 300, (1,), generator=g)))
            except ValueError:
                return  # history outgrew w_max (BudgetError): covered by the working-context tests
        blocks_before = _block_levels(wc)
        tel = wc.refocus(torch.randn(len(wc), generator=g) * scale, acfg)
        check_invariants(wc)  # tiling, alignment, level consistency, protected tail, budget
        assert int(tel.n_expand) + int(tel.n_collapse) <= n_diff
        assert float(tel.utilisation) <= 1.0
        changed = int((_block_levels(wc) != blocks_before).sum())
        assert float(tel.swap_rate) == pytest.approx(changed / max(len(blocks_before), 1))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 60_000), seed=st.integers(0, 2**16), tau=st.floats(0.0, 1.0))
def test_scores_inside_thresholds_change_nothing(n, seed, tau):
    wc = WorkingContext.assemble(n, WorkingContextConfig(w_max=1024))
    before = [t.clone() for t in wc.state.fields()[:2]]
    acfg = AllocatorConfig(tau_expand=tau, tau_collapse=tau)
    g = torch.Generator().manual_seed(seed)
    for scores in (torch.zeros(len(wc)), (torch.rand(len(wc), generator=g) * 2 - 1) * tau):
        tel = wc.refocus(scores, acfg)
        assert int(tel.n_expand) == int(tel.n_collapse) == 0 and tel.actions() == []
        assert all(torch.equal(a, b) for a, b in zip(wc.state.fields()[:2], before, strict=True))


def _reversal_gaps(cooldown: int, steps: int = 40) -> list[int]:
    """Alternate all-positive / all-negative scores; return the step gaps between a block's change and
    its next change in the opposite direction."""
    wc = WorkingContext.assemble(30_000, WorkingContextConfig(w_max=1024))
    acfg = AllocatorConfig(cooldown=cooldown, n_diff=64)
    nb = wc.num_blocks
    last_dir, last_step, gaps = np.zeros(nb), np.zeros(nb), []
    for step in range(steps):
        sign = 1.0 if step % 2 == 0 else -1.0
        before = _block_levels(wc)
        wc.refocus(torch.full((len(wc),), 5.0 * sign), acfg)
        check_invariants(wc)
        direction = np.sign(before - _block_levels(wc))  # +1 = more detail
        reversed_ = (direction != 0) & (direction == -last_dir)
        gaps += (step - last_step[reversed_]).tolist()
        moved = direction != 0
        last_dir[moved], last_step[moved] = direction[moved], step
    return gaps


def test_cooldown_prevents_flip_flop():
    free = _reversal_gaps(cooldown=0)
    assert free and min(free) == 1  # without cooldown the adversary makes blocks flip every step
    cooled = _reversal_gaps(cooldown=6)
    assert cooled and min(cooled) >= 6


def _room_for(wc: WorkingContext, expansions: int) -> None:
    """Collapse the newest LOD1 sibling runs until ``expansions`` expansions fit."""
    from megacontext.wc.tiling import sibling_runs

    while wc.cost + 31 * expansions > wc.cfg.w_max:
        wc.collapse(int(sibling_runs(wc.levels, wc.indices, wc.protected_from).nonzero()[-1]))


def test_priority_by_score_with_limited_budget():
    wc = WorkingContext.assemble(40_000, WorkingContextConfig(w_max=1024))
    _room_for(wc, 2)
    wc.sync(wc.num_tokens)
    free = (wc.cfg.w_max - wc.cost) // 31
    gists = (wc.levels > 0).nonzero().flatten()
    scores = torch.zeros(len(wc))
    scores[gists[:free + 3]] = torch.linspace(1.0, 2.0, free + 3)  # more wishes than room; no payers
    tel = wc.refocus(scores, AllocatorConfig(swap_margin=10.0))
    chosen = tel.expand.nonzero().flatten()
    assert len(chosen) == free and int(tel.n_collapse) == 0
    assert set(chosen.tolist()) == set(gists[3:free + 3].tolist())  # the best-scored ones


def test_collapses_pay_for_expansions_when_margin_allows():
    wc = WorkingContext.assemble(40_000, WorkingContextConfig(w_max=1024))
    _room_for(wc, 1)
    wc.expand(int((wc.levels == 1).nonzero()[0]))  # budget now full, one raw block far in the past
    wc.step += 10  # let its cooldown expire
    raw_old = int(((wc.levels == 0) & (wc.indices < wc.protected_from)).nonzero()[0])
    target = int((wc.levels == 1).nonzero()[-1])
    scores = torch.full((len(wc),), 0.9)  # content everywhere: LOD1 runs are poor payers
    scores[target], scores[raw_old] = 1.0, 0.5
    strict = AllocatorConfig(tau_expand=0.95, swap_margin=0.6)
    no = wc.clone().refocus(scores, strict)
    assert int(no.n_expand) == int(no.n_collapse) == 0  # 1.0 does not beat 0.5 by the margin
    cost, block_old, block_target = wc.cost, int(wc.indices[raw_old]), int(wc.indices[target])
    tel = wc.refocus(scores, strict.replace(swap_margin=0.2))
    assert tel.actions() == [("collapse", 0, block_old), ("expand", 1, block_target)]
    assert wc.cost == cost and float(tel.swap_rate) > 0
    check_invariants(wc)


def test_voluntary_collapse_and_protected_tail():
    wc = WorkingContext.assemble(3_000, WorkingContextConfig(w_max=4096, recent_raw=200))
    assert (wc.levels == 0).all()
    tel = wc.refocus(torch.full((len(wc),), -3.0), AllocatorConfig(n_diff=1000))
    protected = wc.protected_from
    assert int(tel.n_collapse) == protected  # every unprotected block, none of the recent ones
    assert (wc.levels[wc.indices >= protected] == 0).all() and (wc.levels[:protected] == 1).all()
    assert float(tel.utilisation) == pytest.approx(wc.cost / 4096)


def test_score_shape_is_checked_and_config_validated():
    wc = WorkingContext.assemble(1_000)
    with pytest.raises(ValueError, match=r"shape \[E\]"):
        wc.refocus(torch.zeros(len(wc) + 1))
    with pytest.raises(ConfigError, match="n_diff=-1"):
        AllocatorConfig(n_diff=-1)
