"""The cheap learned-focus round gives exactly what the recompute-everything round gave: entry features from the
per-history table, the memo of identical calls, the trimmed LensNet forward and the lazy allocator statistics."""

from __future__ import annotations

import pytest
import torch

from megacontext.core.lod import BLOCK
from megacontext.focus.entry_table import EntryTable
from megacontext.focus.lens import LensPolicy, entry_vectors_from_source
from megacontext.lensnet.model import LensNet, LensNetConfig, _DualLayer, age_encoding, key_attn_mask
from megacontext.runtime.engine import Engine, EngineConfig
from megacontext.tree import InMemoryHistory, MeanPoolCompressor, MegaContextTree, TreeConfig
from megacontext.wc import AllocatorConfig, WorkingContext, WorkingContextConfig
from megacontext.wc.allocator import allocate
from megacontext.wc.tiling import apply_actions


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    # a small vocabulary so that blocks share words and the lexical feature has matches to find
    return torch.randint(1, 40, (n,), generator=torch.Generator().manual_seed(seed))


def _net(base, seed: int = 0) -> LensNet:
    """A lexical LensNet with random weights everywhere (an untrained one scores 0: nothing would move)."""
    torch.manual_seed(seed)
    net = LensNet(LensNetConfig(lexical_features=3, tail_tokens=32), base.d_model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


def _engine(base, tmp_path, name: str, cache: bool, net: LensNet, w_max: int = 384) -> Engine:
    tree = MegaContextTree.create(tmp_path / name, base.d_model, base.fingerprint,
                                  MeanPoolCompressor.from_base(base), config=TreeConfig(durable=False))
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=w_max, recent_raw=64), focus="lensnet")
    return Engine(base, tree, cfg, policy=LensPolicy(net, base, cache=cache))


@pytest.mark.parametrize("min_rows", [4096, 8])  # 8: the table compacts itself most rounds
def test_entry_table_rows_equal_the_reference_features(tiny_base, min_rows):
    hist = InMemoryHistory(_ids(40 * BLOCK * 32), MeanPoolCompressor.from_base(tiny_base), gist_dtype="float32")
    table = EntryTable(lambda s, lv, ix: entry_vectors_from_source(tiny_base, s, lv, ix), tiny_base.d_model,
                       tiny_base.device, min_rows=min_rows, rows_per_entry=1)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # overlapping entry sets, as successive focus rounds see them
        lv = torch.randint(0, 3, (50,), generator=g)
        limit = torch.tensor([hist.num_tokens // BLOCK, hist.num_tokens // BLOCK, hist.num_tokens // BLOCK ** 2])
        ix = (torch.rand(50, generator=g) * limit[lv]).long()
        assert torch.equal(table.get(hist, lv, ix), entry_vectors_from_source(tiny_base, hist, lv, ix))
        assert table._used <= max(min_rows, 50) + 50  # bounded: compacted to the current entries before growing
    assert table.hits > 0 and table.misses > 0
    # another history object resets the table: no row of the first history is served for it
    other = InMemoryHistory(_ids(4 * BLOCK * 32, seed=5), MeanPoolCompressor.from_base(tiny_base),
                            gist_dtype="float32")
    lv, ix = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 1])
    assert torch.equal(table.get(other, lv, ix), entry_vectors_from_source(tiny_base, other, lv, ix))
    assert table.hits == 0 and table.misses == 3


def test_cached_policy_gives_the_reference_scores_and_focus(tiny_base, tmp_path):
    """Same NLL, same tiling (levels, indices, born, origin) and same actions per round with and without the
    table and memo, on a history far past the budget where the focus moves old entries."""
    net = _net(tiny_base)
    ids = _ids(6000)
    runs = {}
    for cache in (False, True):
        eng = _engine(tiny_base, tmp_path, f"s{cache}", cache, net)
        seen, inner = [], eng.policy.scores
        eng.policy.scores = lambda wc, state, inner=inner, seen=seen: seen.append(inner(wc, state)) or seen[-1]
        eng.ingest(ids[:5000])
        nll = eng.score(ids[5000:5600]).nll
        eng.focus_on(ids[5600:5640])  # prompt rounds: the memo serves the rounds whose inputs repeat
        acts = [(r.expands, r.collapses) for r in eng.telemetry.records]
        runs[cache] = (nll, [t.clone() for t in eng.wc.state.fields()], acts, eng.policy, seen)
        eng.source.close()
    (nll0, st0, acts0, _, seen0), (nll1, st1, acts1, pol, seen1) = runs[False], runs[True]
    assert len(seen0) == len(seen1) > 20 and all(torch.equal(a, b) for a, b in zip(seen0, seen1, strict=True))
    assert torch.equal(nll0.nan_to_num(-1.0), nll1.nan_to_num(-1.0))
    assert all(torch.equal(a, b) for a, b in zip(st0, st1, strict=True))
    assert acts0 == acts1 and sum(e + c for e, c in acts1) > 0  # the focus did move
    assert pol._table.hits > pol._table.misses  # most entries came from the table


def test_memo_skips_the_network_only_for_identical_inputs(tiny_base):
    net = _net(tiny_base)
    hist = InMemoryHistory(_ids(3000), MeanPoolCompressor.from_base(tiny_base), gist_dtype="float32")
    wc = WorkingContext.assemble(hist.num_tokens, WorkingContextConfig(w_max=256, recent_raw=64))
    pol = LensPolicy(net, tiny_base)
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    q = hist.tokens(2900, 2932)
    a = pol.score_entries(hist, hist.num_tokens, wc.levels, wc.indices, q)
    b = pol.score_entries(hist, hist.num_tokens, wc.levels, wc.indices, q.clone())
    assert torch.equal(a, b) and len(calls) == 1
    pol.score_entries(hist, hist.num_tokens, wc.levels, wc.indices, hist.tokens(2901, 2933))  # another query
    assert len(calls) == 2
    buf = hist.tokens(2800, 2832)
    pol.score_entries(hist, hist.num_tokens, wc.levels, wc.indices, buf)
    buf.copy_(hist.tokens(2901, 2933))  # a caller refilling its query buffer in place gets fresh scores
    pol.score_entries(hist, hist.num_tokens, wc.levels, wc.indices, buf)
    assert len(calls) == 4
    with torch.no_grad():
        net.head_out.bias.add_(1.0)  # a changed network (an optimiser step) is never served stale scores
    c = pol.score_entries(hist, hist.num_tokens, wc.levels, wc.indices, hist.tokens(2901, 2933))
    assert len(calls) == 5 and not torch.equal(c, a)


def test_trimmed_lensnet_forward_matches_the_full_computation(tiny_base):
    """The last layer's skipped tail MLP feeds nothing; the shared masks and kept tail features are the same."""
    torch.manual_seed(0)
    layer = _DualLayer(16, 4, 32, 0.0).eval()
    e, t = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    em = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    tm = torch.zeros(2, 5, dtype=torch.bool)  # no valid key at all: every key is seen
    full = layer(e, t, key_attn_mask(em), key_attn_mask(tm))
    last = layer(e, t, key_attn_mask(em), key_attn_mask(tm), last=True)
    assert torch.equal(full[0], last[0]) and not torch.equal(full[1], last[1])
    assert torch.equal(key_attn_mask(tm), torch.ones(2, 1, 1, 5, dtype=torch.bool))
    net = _net(tiny_base)
    ages = (4 - torch.arange(5)).expand(2, 5)
    assert torch.equal(net._tail_age_features(2, 5, torch.device("cpu"), torch.float32), age_encoding(ages, 8))
    x = (torch.randn(1, 9, tiny_base.d_model), torch.randint(0, 3, (1, 9)), torch.rand(1, 9) * 1e3,
         torch.ones(1, 9, dtype=torch.bool), torch.randn(1, 32, tiny_base.d_model))
    assert torch.equal(net(*x), net(*x))  # the kept features give what fresh ones gave
    assert torch.equal(net(*x), _untrimmed_forward(net, *x))


def _untrimmed_forward(net: LensNet, entries, levels, ages, entry_mask, tail) -> torch.Tensor:
    """LensNet's forward as it was before the trims: masks per attention, fresh tail age features, and every
    layer's tail MLP run (no lexical input here: the network gets zeros for it either way)."""
    import torch.nn.functional as F

    def attend(att, x, y, key_mask):
        return att(x, y, key_attn_mask(key_mask))  # the mask as each attention used to make it for itself

    b, t = tail.shape[:2]
    tail_mask = torch.ones(b, t, dtype=torch.bool)
    tail_ages = (t - 1 - torch.arange(t)).expand(b, t)
    e = (net.entry_in(net.in_norm(entries)) + net.level_embed(levels.clamp(0, 2))
         + net.entry_age(age_encoding(ages, net.cfg.age_features)))
    e = e + net.lex_in(entries.new_zeros(*entries.shape[:2], 3))
    h = net.tail_in(net.in_norm(tail)) + net.tail_age(age_encoding(tail_ages, net.cfg.age_features))
    for layer in net.layers:
        h = h + attend(layer.tail_reads, layer.n_tail(h), layer.n_ent_kv(e), entry_mask)
        e = e + attend(layer.entries_read, layer.n_ent_x(e), layer.n_tail_kv(h), tail_mask)
        g = layer.n_ent_s(e)
        e = e + attend(layer.entries_self, g, g, entry_mask)
        e, h = e + layer.mlp_e(layer.n_mlp_e(e)), h + layer.mlp_t(layer.n_mlp_t(h))
    s = net.head_out(F.silu(net.head_hidden(net.head_norm(e)))).squeeze(-1).float()
    return s.masked_fill(~entry_mask, 0.0)


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_allocator_lazy_statistics_and_no_move_step(scale):
    """A step with no action returns the tiling it got (what the rebuild gave before); the statistics computed on
    access equal their definitions."""
    wc = WorkingContext.assemble(40 * BLOCK * 32, WorkingContextConfig(w_max=1024, recent_raw=64))
    st = wc.state
    scores = torch.randn(len(st), generator=torch.Generator().manual_seed(2)) * scale
    new, tel = allocate(scores, st, w_max=1024, tail_cost=0, protected_from=wc.protected_from, step=9,
                        cfg=AllocatorConfig())
    rebuilt = apply_actions(st, tel.expand, tel.collapse, 9)
    if scale == 0.0:
        assert new is st and int(tel.n_expand) == int(tel.n_collapse) == 0
        assert all(torch.equal(a, b) for a, b in zip(rebuilt.fields(), st.fields(), strict=True))
        assert torch.isnan(tel.residency_changed)
    else:
        assert int(tel.n_expand) + int(tel.n_collapse) > 0
    cost = int(torch.where(new.levels == 0, BLOCK, 1).sum())
    assert float(tel.utilisation) == pytest.approx(cost / 1024)
    changed = tel.expand | tel.collapse
    assert float(tel.swap_rate) >= 0 and (float(tel.swap_rate) > 0) == bool(changed.any())
    per = tel.residency_by_level
    assert per.shape[0] >= 3 and torch.isfinite(per[new.levels.unique()]).all()


def test_cached_lens_score_stays_causal(tiny_base, tmp_path):
    """With the table and memo on, what comes after a token changes neither its NLL nor any earlier focus round."""
    net = _net(tiny_base, seed=3)
    ids = _ids(3400)
    alt = torch.cat([ids[:3250], _ids(150, seed=9)])
    out = []
    for name, stream in (("a", ids), ("b", alt)):
        eng = _engine(tiny_base, tmp_path, name, True, net)
        seen, inner = [], eng.policy.scores
        eng.policy.scores = lambda wc, state, inner=inner, seen=seen: seen.append(inner(wc, state)) or seen[-1]
        eng.ingest(stream[:3000])
        out.append((eng.score(stream[3000:]).nll, seen))
        eng.source.close()
    (nll_a, seen_a), (nll_b, seen_b) = out
    torch.testing.assert_close(nll_a[:250], nll_b[:250], atol=1e-5, rtol=0)  # token 3250 is the first that differs
    early = 1 + 250 // 32  # the settle round and the rounds at every multiple of 32 up to token 3250
    assert all(torch.equal(a, b) for a, b in zip(seen_a[:early], seen_b[:early], strict=True))
    assert not torch.equal(nll_a[250:], nll_b[250:])
