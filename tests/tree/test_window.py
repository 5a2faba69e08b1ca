"""tree.window: a re-based suffix window over a history, and the reach (wc.tiling.reach) that sizes it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.runtime.engine import Engine, EngineConfig
from megacontext.tree import InMemoryHistory, MeanPoolCompressor
from megacontext.tree.window import HistoryWindow, window_start
from megacontext.wc.tiling import first_overflow, min_cost, reach
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig


@settings(max_examples=40, deadline=None)
@given(w_max=st.integers(200, 5000), recent=st.sampled_from([0, 32, 64, 128]))
def test_reach_is_the_longest_fitting_history(w_max, recent):
    if w_max < recent + 32:
        return
    r = reach(w_max, recent)
    assert r % 1024 == 0
    assert all(min_cost(n, recent) <= w_max for n in range(max(r - 2047, 0), r + 1))  # every history up to r fits
    assert any(min_cost(n, recent) > w_max for n in range(r + 1, r + 1025))  # and r is the last such span


@pytest.mark.parametrize("w_max", [126, 160, 200])
def test_reach_matches_the_working_context(w_max):
    cfg = WorkingContextConfig(w_max=w_max, recent_raw=64)
    r = reach(cfg.w_max, cfg.recent_raw)
    for n in (r, r - 5, r - 500):
        WorkingContext.assemble(n, cfg)  # fits
    with pytest.raises(ValueError, match="does not fit"):
        WorkingContext.assemble(first_overflow(cfg.w_max, cfg.recent_raw), cfg)


def test_window_start():
    assert window_start(5000, 10_000) == 0
    assert window_start(10_000, 3000) == 6144  # 10000 - 3000 = 7000 -> down to a multiple of 1024
    assert 10_000 - window_start(10_000, 3000) >= 3000
    with pytest.raises(ValueError, match="length=-1"):
        window_start(10, -1)


@pytest.fixture
def history():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g)
    return InMemoryHistory(torch.randint(0, 50, (5000,), generator=g), MeanPoolCompressor(table))


def test_window_rebases_tokens_and_gists(history):
    w = HistoryWindow(history, 2048)
    assert w.num_tokens == 5000 - 2048
    assert torch.equal(w.tokens(0, 100), history.tokens(2048, 2148))
    assert torch.equal(w.gists(1, 3, 10), history.gists(1, 64 + 3, 64 + 10))
    assert torch.equal(w.gists(2, 0, 2), history.gists(2, 2, 4))
    assert w.num_entries(2) == 2 and w.num_entries(1) == (5000 - 2048) // 32
    assert torch.equal(w.tail_tokens(), history.tail_tokens())
    idx = torch.tensor([5, 0, 91])
    assert torch.equal(w.gather_gists(1, idx), history.gather_gists(1, idx + 64))
    assert torch.equal(w.gather_gists(2, torch.tensor([1])), history.gists(2, 3, 4))
    with pytest.raises(IndexError):
        w.gists(2, 0, 3)
    with pytest.raises(IndexError):
        w.gather_gists(1, torch.tensor([w.num_entries(1)]))  # window-relative bounds, not the source's
    with pytest.raises(ValueError, match="multiple of 1024"):
        HistoryWindow(history, 1000)
    with pytest.raises(ValueError, match="past the end"):
        HistoryWindow(history, 6144)


def test_engine_on_a_window_reads_only_the_window(tiny_base, history):
    class Appendable(InMemoryHistory):
        def append(self, ids):
            self._tokens = torch.cat([self._tokens, torch.as_tensor(ids).long()])

    comp = MeanPoolCompressor.from_base(tiny_base)
    toks = torch.randint(0, tiny_base.vocab_size, (4096,), generator=torch.Generator().manual_seed(1))
    src = Appendable(toks, comp)
    w = HistoryWindow(src, 3072)
    eng = Engine(tiny_base, w, EngineConfig(wc=WorkingContextConfig(w_max=160, recent_raw=64)))
    res = eng.score(torch.randint(0, tiny_base.vocab_size, (31,)))
    assert res.nll.shape == (31,) and not res.nll.isnan().any()
    assert src.num_tokens == 4096 + 31 and eng.num_tokens == 1024 + 31
    start, end = eng.wc.spans()
    assert int(start[0]) == 0 and int(end[-1]) == (1024 + 31) // 32 * 32  # tiles the window, not the history
