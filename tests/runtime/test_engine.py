"""Engine: score parity with the plain base model, invariants over a long stream, KV-cache reuse parity,
focus policies and telemetry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.base import FrozenBase
from megacontext.runtime.engine import EngineConfig, common_prefix
from megacontext.runtime.sampling import SamplingConfig
from megacontext.wc.working_context import WorkingContextConfig, check_invariants
from tests.conftest import tiny_llama, tree_engine

_engine = tree_engine


def test_score_parity_with_plain_base(tiny_base, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (200,))
    eng = _engine(tiny_base, tmp_path, debug=True)
    res = eng.score(ids)
    with torch.no_grad():
        logits = tiny_base.forward(tiny_base.embed(ids)[None], torch.arange(200)).logits[0].float()
    ref = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
    assert res.nll[0].isnan() and res.nll.shape == (200,)
    torch.testing.assert_close(res.nll[1:], ref, atol=1e-4, rtol=1e-4)
    # a second call continues the stream: its first token is now predicted from the memory
    more = torch.randint(1, 128, (40,))
    res2 = eng.score(more)
    full = torch.cat([ids, more])
    with torch.no_grad():
        logits = tiny_base.forward(tiny_base.embed(full)[None], torch.arange(240)).logits[0].float()
    ref2 = torch.nn.functional.cross_entropy(logits[199:-1], more, reduction="none")
    torch.testing.assert_close(res2.nll, ref2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lazy", [False, True])
def test_long_stream_keeps_invariants_and_budget(tiny_base, tmp_path, lazy):
    torch.manual_seed(1)
    eng = _engine(tiny_base, tmp_path, w_max=160, recent_raw=64, focus="lexical", debug=True, lazy_focus=lazy,
                  ingest_batch=1000)
    eng.ingest(torch.randint(1, 128, (2300,)))
    res = eng.score(torch.randint(1, 128, (100,)))
    check_invariants(eng.wc)
    assert eng.wc.cost <= 160 and (eng.wc.levels == 2).any()  # the old history reached LOD2
    assert torch.isfinite(res.nll).all()
    recs = eng.telemetry.records
    assert all(r.wc_cost <= r.w_max for r in recs)
    if lazy:  # one record per 1000-token batch, then the settle round(s), then one refocus per k while scoring
        ingest = [r for r in recs if r.phase == "ingest"]
        assert [r.num_tokens for r in ingest] == [1000, 2000, 2300]
        assert [r.num_tokens for r in recs[-4:]] == [2304, 2336, 2368, 2400]
        recs = [r for r in recs if r.phase == "score"]
    else:
        assert len(recs) == 2400 // 32
    assert sum(r.collapses for r in recs) > 0
    assert len(recs[-1].lod_map) == recs[-1].num_tokens // 32 == 2400 // 32


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_cache_reuse_matches_full_reread(tmp_path, temperature):
    base = FrozenBase(tiny_llama(seed=3), name="tiny")
    torch.manual_seed(2)
    hist, prompt = torch.randint(1, 128, (700,)), torch.randint(1, 128, (20,))
    outs, stats = [], []
    for reuse in (True, False):
        eng = _engine(base, tmp_path / str(reuse), w_max=160, recent_raw=64, focus="lexical", cache_reuse=reuse,
                      debug=True)
        eng.ingest(hist)
        outs.append(list(eng.generate(prompt, SamplingConfig(max_new_tokens=40, temperature=temperature, seed=5))))
        stats.append(dict(eng.read_stats))
        check_invariants(eng.wc)
    assert outs[0] == outs[1] and len(outs[0]) == 40
    assert stats[0]["slots_reused"] > 0 and stats[0]["slots_read"] < stats[1]["slots_read"] / 4
    assert stats[1]["slots_reused"] == 0


def test_generate_stops_on_stop_token(tiny_base, tmp_path):
    eng = _engine(tiny_base, tmp_path)
    eng.ingest(torch.arange(1, 50))
    first = list(eng.generate(torch.tensor([5, 6]), SamplingConfig(max_new_tokens=5)))
    eng2 = _engine(tiny_base, tmp_path / "b")
    eng2.ingest(torch.arange(1, 50))
    stopped = list(eng2.generate(torch.tensor([5, 6]), SamplingConfig(max_new_tokens=5, stop_tokens=(first[0],))))
    assert stopped == first[:1]


def test_peek_does_not_change_memory(tiny_base, tmp_path):
    eng = _engine(tiny_base, tmp_path)
    ids = torch.randint(1, 128, (100,))
    eng.ingest(ids[:90])
    n, levels = eng.num_tokens, eng.wc.levels.clone()
    peek = eng.peek_nll(ids[90:])
    assert eng.num_tokens == n and torch.equal(levels, eng.wc.levels)
    torch.testing.assert_close(peek, eng.score(ids[90:]).nll, atol=1e-4, rtol=1e-4)


def test_common_prefix():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix(a, a[:2]) == 2 and common_prefix(a, torch.tensor([7])) == 0


def test_engine_config_validates():
    with pytest.raises(ValueError, match="recent_raw=32 must be >= k=64"):
        EngineConfig(wc=WorkingContextConfig(w_max=256, recent_raw=32), k=64)
    with pytest.raises(ValueError, match="k=0"):
        EngineConfig(k=0)
    with pytest.raises(ValueError, match="focus='bogus'"):
        EngineConfig(focus="bogus")


class _QueryProbe:
    """A policy that records the query the engine hands it (its typed ``query_tokens`` decides the length)."""

    name = "probe"

    def __init__(self, query_tokens: int):
        self.query_tokens, self.seen = query_tokens, []

    def scores(self, wc, state):
        self.seen.append(state.query.clone())
        return None


@pytest.mark.parametrize("q", [0, 5, 40])
def test_streaming_query_follows_the_policys_query_tokens(tiny_base, tmp_path, q):
    eng = _engine(tiny_base, tmp_path, w_max=512, recent_raw=64, lazy_focus=False)
    eng.policy = probe = _QueryProbe(q)
    ids = torch.randint(1, 100, (96,))
    eng.ingest(ids)
    assert len(probe.seen) == 3  # one refocus per k=32 tokens
    assert torch.equal(probe.seen[-1], ids[len(ids) - q:] if q else ids[:0])


def test_lazy_ingest_refocuses_only_when_the_base_reads(tiny_base, tmp_path):
    """No focus round while ingesting; the next read settles (causally: on the history so far), then scores."""
    eng = _engine(tiny_base, tmp_path, w_max=512, recent_raw=64)
    eng.policy = probe = _QueryProbe(8)
    ids = torch.randint(1, 100, (300,))
    eng.ingest(ids[:250])
    assert probe.seen == []
    eng.score(ids[250:])
    # the probe never moves the WC, so the settle stops after one round: it saw the last 8 tokens of the ingest
    assert torch.equal(probe.seen[0], ids[242:250])
    assert len(probe.seen) == 1 + 2  # settle + refocus at 256 and 288
    eng.ingest(ids[:10])
    n = len(probe.seen)
    list(eng.generate(ids[:3], SamplingConfig(max_new_tokens=2)))
    assert len(probe.seen) == n + eng.cfg.query_rounds  # the prompt's rounds settle the WC


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(1, 90), min_size=1, max_size=6), st.sampled_from([128, 160, 200]),
       st.sampled_from(["recency", "lexical"]))
def test_stream_is_independent_of_call_chunking(cuts, w_max, focus):
    """score() over a stream split into arbitrary calls == one call; invariants hold at every step."""
    import tempfile

    from megacontext.base import FrozenBase

    base = FrozenBase(tiny_llama(), name="tiny")
    torch.manual_seed(sum(cuts))
    ids = torch.randint(1, 128, (sum(cuts) + 300,))
    runs = []
    for pieces in ([ids], list(torch.split(ids, [*cuts, 300]))):
        with tempfile.TemporaryDirectory() as d:
            eng = _engine(base, Path(d), w_max=w_max, recent_raw=64, focus=focus, debug=True)
            nll = torch.cat([eng.score(p).nll for p in pieces])
            runs.append((nll, eng.wc.levels.clone(), eng.wc.indices.clone(), len(eng.telemetry.records)))
            assert all(r.wc_cost <= w_max for r in eng.telemetry.records)
    (a, la, ia, na), (b, lb, ib, nb) = runs
    torch.testing.assert_close(a, b, equal_nan=True, atol=1e-4, rtol=1e-4)
    assert torch.equal(la, lb) and torch.equal(ia, ib) and na == nb == ids.numel() // 32


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2), st.sampled_from([128, 200, 1024]))
def test_tiling_keys_match_the_materialised_slots(n, extra, w_max):
    """tiling_keys (no gather) == slot_keys of the materialised WC, so a reader can decide before it gathers."""
    from megacontext.runtime.reader import slot_keys, tiling_keys
    from megacontext.tree import MeanPoolCompressor
    from megacontext.tree.history import InMemoryHistory
    from megacontext.wc import WorkingContext

    base = FrozenBase(tiny_llama(), name="tiny")
    hist = InMemoryHistory(torch.randint(1, 128, (n,)), MeanPoolCompressor.from_base(base))
    wc = WorkingContext(WorkingContextConfig(w_max=w_max, recent_raw=64))
    wc.sync(n)
    for _ in range(extra):  # some focus moves, so gists of several levels sit between raw blocks
        wc.refocus(torch.randn(len(wc)))
    m = wc.materialize(hist, base.embed)
    assert torch.equal(tiling_keys(wc.levels, wc.indices, n), slot_keys(m, wc.levels, wc.indices, n).cpu())


@pytest.mark.parametrize("focus", ["recency", "lexical"])
def test_score_groups_and_cache_reuse_match_one_forward_per_chunk(tmp_path, focus):
    """Grouped forwards with KV-prefix reuse give the NLL of one full forward per chunk, on a history far past
    the budget (collapses and refocus moves between chunks)."""
    base = FrozenBase(tiny_llama(seed=4), name="tiny")
    torch.manual_seed(3)
    ids = torch.randint(1, 128, (1500,))
    runs = []
    for reuse, group in ((True, 512), (False, 32)):
        eng = _engine(base, tmp_path / f"{reuse}", w_max=200, recent_raw=64, focus=focus, cache_reuse=reuse,
                      score_group=group, debug=True)
        eng.ingest(ids[:700])
        runs.append((eng.score(ids[700:]).nll, dict(eng.read_stats)))
    (a, sa), (b, sb) = runs
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert sa["score_slots_reused"] > 0 and sa["score_slots_read"] < sb["score_slots_read"]
    assert sb["score_slots_reused"] == 0


def _sharp(model):
    """A tiny random model with larger weights: varied greedy tokens, so token-equality tests can fail."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["static"])
def test_fast_decode_gives_the_same_tokens(tmp_path, mode, temperature):
    """The static-cache (and, on CUDA, compiled) decode path generates exactly the dynamic path's tokens."""
    base = FrozenBase(_sharp(tiny_llama(seed=3)).to("cuda" if mode == "compiled" else "cpu"), name="tiny")
    torch.manual_seed(2)
    hist, prompt = torch.randint(1, 128, (700,)), torch.randint(1, 128, (20,))
    outs = []
    for fast in ("off", mode):
        eng = _engine(base, tmp_path / fast, w_max=160, recent_raw=64, focus="lexical", fast_decode=fast)
        eng.ingest(hist)
        outs.append(list(eng.generate(prompt, SamplingConfig(max_new_tokens=70, temperature=temperature, seed=5))))
    assert outs[0] == outs[1] and len(outs[0]) == 70 and len(set(outs[0])) > 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compiled_decode_on_cuda_gives_the_same_tokens(tmp_path, temperature):
    """CUDA graphs (torch.compile reduce-overhead) over the static cache: same tokens as the dynamic path."""
    test_fast_decode_gives_the_same_tokens(tmp_path, "compiled", temperature)


@pytest.mark.parametrize("fast", ["off", "static"])
def test_generate_equals_plain_hf_greedy_when_the_budget_holds_everything(tmp_path, fast):
    """Budget >= history: the WC is the raw history at its own positions, so greedy tokens are HF's own."""
    model = _sharp(tiny_llama(seed=7))
    base = FrozenBase(model, name="tiny")
    torch.manual_seed(4)
    hist, prompt = torch.randint(1, 128, (300,)), torch.randint(1, 128, (10,))
    eng = _engine(base, tmp_path, w_max=1024, recent_raw=64, fast_decode=fast)
    eng.ingest(hist)
    ours = list(eng.generate(prompt, SamplingConfig(max_new_tokens=40)))
    ctx = torch.cat([hist, prompt])[None]
    with torch.no_grad():
        ref = model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=40, min_new_tokens=40,
                             do_sample=False, pad_token_id=0)[0, ctx.shape[1]:].tolist()
    assert ours == ref and len(set(ref)) > 5


def test_static_readers_sharing_one_model_stay_correct(tmp_path):
    """Two memories on one base generate in turns: the shared static buffers are re-read, never mixed up."""
    base = FrozenBase(_sharp(tiny_llama(seed=5)), name="tiny")
    torch.manual_seed(6)
    hists = [torch.randint(1, 128, (500,)), torch.randint(1, 128, (400,))]
    sampling = SamplingConfig(max_new_tokens=40)

    def engines(fast):
        out = []
        for i, h in enumerate(hists):
            eng = _engine(base, tmp_path / f"{fast}{i}", w_max=160, recent_raw=64, fast_decode=fast)
            eng.ingest(h)
            out.append(eng)
        return out

    ref = [list(e.generate(torch.tensor([3, 4]), sampling)) for e in engines("off")]
    gens = [e.generate(torch.tensor([3, 4]), sampling) for e in engines("static")]
    got: list[list[int]] = [[], []]
    for _ in range(40):  # interleaved token by token
        for i, g in enumerate(gens):
            got[i].append(next(g))
    assert got == ref


def test_fast_decode_falls_back_cleanly_when_unsupported(tmp_path, monkeypatch, caplog):
    """A model or transformers version without static-cache support: one warning, the dynamic path's tokens."""
    import transformers

    def broken(*a, **k):
        raise NotImplementedError("no static cache for this model")

    base = FrozenBase(_sharp(tiny_llama(seed=8)), name="tiny")
    torch.manual_seed(9)
    hist = torch.randint(1, 128, (400,))
    outs = []
    for fast in ("off", "static"):
        if fast == "static":
            monkeypatch.setattr(transformers, "StaticCache", broken)
        eng = _engine(base, tmp_path / fast, w_max=160, recent_raw=64, fast_decode=fast)
        eng.ingest(hist)
        outs.append(list(eng.generate(torch.tensor([7, 8]), SamplingConfig(max_new_tokens=30))))
    assert outs[0] == outs[1]
    assert "using the dynamic cache" in caplog.text
