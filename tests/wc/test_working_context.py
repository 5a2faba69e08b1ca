"""Working context: tiling invariants, recency policy, explicit actions, materialisation and base-model parity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.config import ConfigError
from megacontext.core.lod import BLOCK, segment_ids
from megacontext.tree.history import HistorySource
from megacontext.wc.materialize import PAD_SLOT, TAIL_SLOT, materialize_batch
from megacontext.wc.tiling import EntryState, min_cost, min_w_max, sibling_runs
from megacontext.wc.working_context import (
    BudgetError,
    IllegalActionError,
    InvariantError,
    WorkingContext,
    WorkingContextConfig,
    WorkingContextError,
    check_invariants,
)


class FakeSource:
    """Random token ids and random gists in tensors: a minimal :class:`HistorySource` (the tree's read API)."""

    fingerprint, compressor_version = "fake", "random"

    def __init__(self, num_tokens: int, d: int = 8, vocab: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_tokens, self.d_model = num_tokens, d
        self.ids = torch.randint(0, vocab, (num_tokens,), generator=g)
        self.gist_tables = {lvl: torch.randn(num_tokens // BLOCK ** lvl + 1, d, generator=g) for lvl in (1, 2)}
        self.token_calls = 0

    def tokens(self, start: int, end: int) -> torch.Tensor:
        self.token_calls += 1
        return self.ids[start:end]

    def gather_gists(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        return self.gist_tables[level][indices]

    def gists(self, level: int, start_index: int, end_index: int) -> torch.Tensor:
        return self.gist_tables[level][start_index:end_index]

    def num_entries(self, level: int) -> int:
        return self.num_tokens // BLOCK ** max(level, 1)

    def tail_tokens(self) -> torch.Tensor:
        return self.ids[self.num_tokens // BLOCK * BLOCK:]


def _table_embed(d: int = 8, vocab: int = 128):
    table = torch.randn(vocab, d, generator=torch.Generator().manual_seed(1))
    return lambda ids: table[ids]


def _snapshot(wc: WorkingContext):
    return [t.clone() for t in wc.state.fields()], wc.num_tokens, wc.cost


def _same(wc: WorkingContext, snap, tiling_only: bool = False) -> bool:
    """Same tiling (and, unless tiling_only, the same cooldown bookkeeping)."""
    fields, n, cost = snap
    keep = 2 if tiling_only else 4
    return all(torch.equal(a, b) for a, b in zip(wc.state.fields()[:keep], fields[:keep], strict=True)) and (
        wc.num_tokens, wc.cost) == (n, cost)


def test_fake_source_matches_protocol():
    assert isinstance(FakeSource(64), HistorySource)


def test_short_history_is_all_raw():
    wc = WorkingContext.assemble(200, WorkingContextConfig(w_max=1024))
    assert wc.levels.tolist() == [0] * 6 and wc.tail_len == 8 and wc.cost == 200
    check_invariants(wc)


def test_assembly_is_recency_ordered_and_fills_budget():
    cfg = WorkingContextConfig(w_max=1024, recent_raw=128)
    wc = WorkingContext.assemble(70_000, cfg)
    check_invariants(wc)
    lv = wc.levels
    assert torch.all(lv[1:] <= lv[:-1]), "oldest LOD2, then LOD1, newest LOD0"
    assert set(lv.tolist()) == {0, 1, 2}
    assert cfg.w_max - 31 < wc.cost <= cfg.w_max  # no further expansion would fit


@settings(max_examples=25, deadline=None)
@given(w_max=st.integers(200, 3000), recent=st.integers(0, 150),
       steps=st.lists(st.integers(0, 5000), min_size=1, max_size=12))
def test_sync_keeps_invariants(w_max, recent, steps):
    cfg = WorkingContextConfig(w_max=max(w_max, min_w_max(recent)), recent_raw=recent)
    wc = WorkingContext(cfg)
    n = 0
    for inc in steps:
        n += inc
        if min_cost(n, recent) > cfg.w_max:
            snap = _snapshot(wc)
            with pytest.raises(BudgetError, match=f"w_max >= {min_cost(n, recent)}"):
                wc.sync(n)
            assert _same(wc, snap)
            return
        wc.sync(n)
        check_invariants(wc)
        assert wc.num_tokens == n


def test_sync_refuses_shrinking():
    wc = WorkingContext.assemble(500)
    with pytest.raises(WorkingContextError, match="num_tokens=100"):
        wc.sync(100)


def test_config_validation_names_bad_values():
    with pytest.raises(ConfigError, match="w_max=100"):
        WorkingContextConfig(w_max=100, recent_raw=128)
    with pytest.raises(ConfigError, match="'relative'"):
        WorkingContextConfig(position_mode="relative")


def test_check_invariants_catches_broken_tilings():
    wc = WorkingContext.assemble(5_000, WorkingContextConfig(w_max=512))
    good = wc.state
    gap = EntryState(*(t[torch.arange(len(wc)) != 3] for t in good.fields()))
    wc.state, wc._cost = gap, None
    with pytest.raises(InvariantError, match="do not abut"):
        check_invariants(wc)
    lv = good.levels.clone()
    lv[-1] = 1  # a protected recent block as a gist
    wc.state = EntryState(lv, good.indices, good.born, good.origin)
    with pytest.raises(InvariantError, match="protected"):
        check_invariants(wc)
    lv = good.levels.clone()
    lv[lv == 1] = 0  # everything raw: far over budget
    wc.state = EntryState(lv, good.indices, good.born, good.origin)
    with pytest.raises(InvariantError, match="exceeds w_max"):
        check_invariants(wc)


def test_expand_collapse_roundtrip_and_illegal_requests():
    wc = WorkingContext.assemble(100_000, WorkingContextConfig(w_max=2048))
    lod2 = int((wc.levels == 2).nonzero()[-1])  # the newest LOD2: its run of 32 siblings is incomplete
    while wc.cost + 62 > wc.cfg.w_max:  # make room for two expansions: collapse the oldest LOD1 runs
        wc.collapse(int((sibling_runs(wc.levels, wc.indices, wc.protected_from) & (wc.levels == 1)).nonzero()[0]))
    before = _snapshot(wc)
    idx2 = int(wc.indices[lod2])
    wc.expand(lod2)
    check_invariants(wc)
    assert wc.levels[lod2:lod2 + 32].tolist() == [1] * 32
    assert wc.indices[lod2:lod2 + 32].tolist() == list(range(idx2 * 32, idx2 * 32 + 32))
    assert wc.cost == before[2] + 31
    wc.collapse(lod2 + 7)  # any sibling names the run
    assert _same(wc, before, tiling_only=True)
    before = _snapshot(wc)

    for bad, err in [(lambda: wc.expand(len(wc) - 1), "LOD0 block"),
                     (lambda: wc.collapse(len(wc) - 1), "protected"),
                     (lambda: wc.collapse(lod2), "parent LOD3 .* needs all 32 siblings"),
                     (lambda: wc.expand(len(wc) + 5), "out of range")]:
        with pytest.raises(IllegalActionError, match=err):
            bad()
        assert _same(wc, before)

    wc.expand(lod2)
    wc.expand(lod2 + 3)  # LOD1 -> raw breaks the sibling run
    snap = _snapshot(wc)
    with pytest.raises(IllegalActionError, match="all 32"):
        wc.collapse(lod2)
    assert _same(wc, snap)


def test_expand_over_budget_is_refused():
    wc = WorkingContext.assemble(40_000, WorkingContextConfig(w_max=1024))
    assert wc.cost + 31 > 1024
    snap = _snapshot(wc)
    with pytest.raises(IllegalActionError, match="w_max=1024"):
        wc.expand(0)
    assert _same(wc, snap)


@pytest.mark.parametrize("mode", ["absolute", "compact"])
def test_materialize_places_tokens_and_gists(mode):
    n = 40_000 + 13
    src, embed = FakeSource(n), _table_embed()
    wc = WorkingContext.assemble(n, WorkingContextConfig(w_max=1024, position_mode=mode))
    lod2 = int((wc.levels == 2).nonzero()[0])
    while wc.cost + 62 > wc.cfg.w_max:
        wc.collapse(int(sibling_runs(wc.levels, wc.indices, wc.protected_from).nonzero()[-1]))
    wc.expand(lod2)
    wc.expand(lod2 + 3)  # a raw island among gists: a second raw run
    assert set(wc.levels.tolist()) == {0, 1, 2}
    out = wc.materialize(src, embed)
    assert out.inputs_embeds.shape == (wc.cost, 8) and out.position_ids.shape == (wc.cost,)
    assert (out.slot_entry == TAIL_SLOT).sum() == wc.tail_len
    start, end = wc.spans()
    for e in range(len(wc)):  # reference check, loop is fine in a test
        first, count = int(out.entry_first_slot[e]), int(out.entry_num_slots[e])
        sl = slice(first, first + count)
        assert (out.slot_entry[sl] == e).all()
        lvl, idx = int(wc.levels[e]), int(wc.indices[e])
        if lvl == 0:
            assert torch.equal(out.inputs_embeds[sl], embed(src.ids[start[e]:end[e]]))
            want_pos = torch.arange(int(start[e]), int(end[e]))
        else:
            assert torch.equal(out.inputs_embeds[first], src.gist_tables[lvl][idx])
            want_pos = torch.tensor([(int(start[e]) + int(end[e])) // 2])
        if mode == "absolute":
            assert torch.equal(out.position_ids[sl], want_pos)
    assert torch.equal(out.inputs_embeds[-wc.tail_len:], embed(src.ids[-wc.tail_len:]))
    if mode == "compact":
        assert torch.equal(out.position_ids, torch.arange(wc.cost))
    else:
        assert torch.all(out.position_ids[1:] > out.position_ids[:-1])
    assert src.token_calls <= 1 + int((wc.levels == 0).sum())  # per raw run, never per token


def test_materialize_refuses_short_source():
    wc = WorkingContext.assemble(1000)
    with pytest.raises(WorkingContextError, match="holds 500 tokens"):
        wc.materialize(FakeSource(500), _table_embed())


def test_parity_with_base_model_when_everything_is_raw(tiny_base, tiny_model):
    """All-LOD0 working context == the unmodified model on the raw tokens, exactly."""
    ids = torch.randint(0, tiny_base.vocab_size, (333,), generator=torch.Generator().manual_seed(3))
    src = FakeSource(333, d=tiny_base.d_model)
    src.ids = ids
    wc = WorkingContext.assemble(333, WorkingContextConfig(w_max=1024))
    assert (wc.levels == 0).all()
    out = wc.materialize(src, tiny_base.embed)
    assert torch.equal(out.position_ids, torch.arange(333))
    with torch.no_grad():
        got = tiny_base.forward(out.inputs_embeds[None], out.position_ids[None]).logits
        ref = tiny_model(input_ids=ids[None]).logits
    assert torch.equal(got, ref)


def test_batched_materialize_matches_single(tiny_base):
    d = tiny_base.d_model
    srcs = [FakeSource(n, d=d, seed=n) for n in (300, 2_500, 4_100)]
    wcs = [WorkingContext.assemble(s.num_tokens, WorkingContextConfig(w_max=512)) for s in srcs]
    batch = materialize_batch(wcs, srcs, tiny_base.embed)
    width = max(wc.cost for wc in wcs)
    assert batch.inputs_embeds.shape == (3, width, d)
    assert batch.attention_mask.sum(1).tolist() == [wc.cost for wc in wcs]
    assert ((batch.slot_entry == PAD_SLOT) == (batch.attention_mask == 0)).all()
    with torch.no_grad():
        last = tiny_base.forward(batch.inputs_embeds, batch.position_ids, batch.attention_mask).logits[:, -1]
        for b, (wc, src) in enumerate(zip(wcs, srcs, strict=True)):
            one = wc.materialize(src, tiny_base.embed)
            pad = width - wc.cost
            assert torch.equal(batch.inputs_embeds[b, pad:], one.inputs_embeds)
            assert torch.equal(batch.items[b].entry_first_slot, one.entry_first_slot + pad)
            ref = tiny_base.forward(one.inputs_embeds[None], one.position_ids[None],
                                    one.attention_mask[None]).logits[0, -1]
            torch.testing.assert_close(last[b], ref, atol=1e-4, rtol=1e-4)


def test_gist_positions_attend_across_position_jumps(tiny_base):
    """transformers >= 5 reads gaps in position_ids as packed-document boundaries when no mask is given;
    FrozenBase always passes one, so materialised gists (which jump positions) stay visible to later slots."""
    src = FakeSource(5_000, d=tiny_base.d_model)
    wc = WorkingContext.assemble(5_000, WorkingContextConfig(w_max=256))
    one = wc.materialize(src, tiny_base.embed)
    assert (one.position_ids.diff() > 1).any()  # the case under test: positions do jump
    with torch.no_grad():
        masked = tiny_base.forward(one.inputs_embeds[None], one.position_ids[None], one.attention_mask[None])
        unmasked = tiny_base.forward(one.inputs_embeds[None], one.position_ids[None])
        poked = one.inputs_embeds.clone()
        poked[0] += 1.0  # the oldest gist: the last slot must see it
        changed = tiny_base.forward(poked[None], one.position_ids[None])
    torch.testing.assert_close(unmasked.logits, masked.logits, rtol=0, atol=0)
    assert (changed.logits[0, -1] - masked.logits[0, -1]).abs().max() > 1e-5


def test_materialize_is_differentiable_in_gists():
    src = FakeSource(20_000)
    src.gist_tables = {k: v.requires_grad_() for k, v in src.gist_tables.items()}
    wc = WorkingContext.assemble(20_000, WorkingContextConfig(w_max=1024))
    wc.materialize(src, _table_embed()).inputs_embeds.sum().backward()
    assert src.gist_tables[1].grad.abs().sum() > 0


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 40), max_size=60))
def test_segment_ids_equals_repeat_interleave(counts):
    n = torch.tensor(counts, dtype=torch.long)
    want = torch.repeat_interleave(torch.arange(n.shape[0]), n)
    assert torch.equal(segment_ids(n, int(n.sum())), want)
