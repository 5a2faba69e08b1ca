"""MegaContext bench systems on a tiny random base with tiny random GistNet / LensNet checkpoints."""

from __future__ import annotations

import pytest
import torch

from megacontext.bench.harness import BenchResult, aggregate, run_systems
from megacontext.bench.megacontext_systems import MegaContextSystem, PrefixHistory
from megacontext.bench.registry import SystemUnavailable, build_system
from megacontext.bench.scoring import chunk_bounds, score_chunked
from megacontext.bench.tasks import TokenDoc, far_recall_samples, passkey_samples, perplexity_samples
from megacontext.bench.truncation import FullAttention, Truncation, WindowConfig
from megacontext.core.lod import BLOCK
from megacontext.focus import RecencyFocus
from megacontext.gistnet.model import GistNet, GistNetConfig
from megacontext.lensnet.model import LensNet, LensNetConfig
from megacontext.runtime.engine import Engine, EngineConfig
from megacontext.tree import MeanPoolCompressor
from megacontext.wc.working_context import WorkingContextConfig

NAMES = ("megacontext", "megacontext-recency", "megacontext-lensnet", "megacontext-lexical", "meanpool-recency",
         "megacontext-rawfirst", "megacontext-lensnet-rawfirst")


def _encode(text):
    return [ord(c) % 128 for c in text]


@pytest.fixture
def checkpoints(tiny_base, tmp_path):
    torch.manual_seed(0)
    GistNet(GistNetConfig(layers=1, heads=2), tiny_base.d_model, tiny_base.embed_norm).save(tmp_path / "gn", tiny_base)
    LensNet(LensNetConfig(layers=1, tail_tokens=8), tiny_base.d_model).save(tmp_path / "ln", tiny_base)
    return {"gistnet": str(tmp_path / "gn"), "lensnet": str(tmp_path / "ln")}


@pytest.fixture
def samples():
    g = torch.Generator().manual_seed(1)
    # repeated 4-grams so the lexical policy finds matches and actually moves the focus
    docs = [TokenDoc("d0", torch.randint(0, 128, (900,), generator=g).repeat(2))]
    return (far_recall_samples(docs, [600], 2, passage_min=40, passage_max=70, lead=64)
            + passkey_samples(docs, _encode, [500], 1, lead=64))


def test_every_system_finite_within_budget(tiny_base, checkpoints, samples):
    w_max = 256
    for name in NAMES:
        system = build_system(name, tiny_base, {**checkpoints, "chunk": 32, "recent_raw": 64})
        scores = system.score(tiny_base, samples, w_max)
        assert len(scores) == len(samples)
        for sample, sc in zip(samples, scores, strict=True):
            assert sc.nll.shape == (sample.n_targets,) and torch.isfinite(sc.nll).all(), name
            assert sc.flops > 0
        read = system.describe()["max_slots_read"][str(w_max)]
        # histories are ~700 tokens, so the WC had to compress, yet fills most of the budget
        assert w_max // 2 < read <= w_max, (name, read)


def test_recency_equals_full_attention_when_everything_fits(tiny_base, checkpoints, samples):
    w_max = 2048  # > every sample, so the recency WC is the raw history
    full = score_chunked(tiny_base, FullAttention(4096, WindowConfig(chunk=32)), samples, w_max)
    for name in ("megacontext-recency", "meanpool-recency"):
        system = build_system(name, tiny_base, {**checkpoints, "chunk": 32})
        got = system.score(tiny_base, samples, w_max)
        for a, b in zip(got, full, strict=True):
            torch.testing.assert_close(a.nll, b.nll, atol=1e-4, rtol=1e-4)
            assert torch.equal(a.top1, b.top1)


class _ExpandGists:
    """A decisive policy: expand every gist, collapse raw blocks; counts its calls."""

    name = "spy"
    calls = 0

    def scores(self, wc, state):
        type(self).calls += 1
        return torch.where(wc.levels > 0, 5.0, -5.0)


def test_policy_refocuses_before_every_chunk(tiny_base, samples):
    from megacontext.bench.megacontext_systems import MegaContextSystemConfig

    cfg = MegaContextSystemConfig(chunk=32, recent_raw=64, rounds=3)
    comp = MeanPoolCompressor.from_base(tiny_base)
    rec = build_system("meanpool-recency", tiny_base, {"chunk": 32, "recent_raw": 64})
    spy = MegaContextSystem("spy", tiny_base, comp, _ExpandGists, cfg)
    a, b = rec.score(tiny_base, samples, 256), spy.score(tiny_base, samples, 256)
    n_chunks = sum(-(-s.n_targets // 32) for s in samples)
    assert _ExpandGists.calls == 3 * n_chunks
    assert any(not torch.allclose(x.nll, y.nll) for x, y in zip(a, b, strict=True))
    assert spy.describe()["max_slots_read"]["256"] <= 256


def test_lensnet_system_runs_its_policy(tiny_base, checkpoints, samples):
    lens = build_system("megacontext-lensnet", tiny_base, {**checkpoints, "recent_raw": 64})
    assert lens.make_policy().name == "lensnet" and lens.describe()["focus"] == "lensnet"
    product = build_system("megacontext", tiny_base, {**checkpoints, "recent_raw": 64})  # the product default
    assert product.name == "megacontext" and product.describe()["focus"] == "lensnet"


def test_missing_checkpoint_is_unavailable(tiny_base, tmp_path):
    with pytest.raises(SystemUnavailable, match="GistNet checkpoint"):
        build_system("megacontext-recency", tiny_base, {"gistnet": str(tmp_path / "nope")})


def test_budget_too_small_for_chunk_is_a_clear_error(tiny_base, samples):
    system = build_system("meanpool-recency", tiny_base, {"chunk": 32, "recent_raw": 128})
    with pytest.raises(ValueError, match="w_max=160"):
        system.score(tiny_base, samples, 160)


def _engine_reference(system, sample, history, w_max):
    """The unbatched path MegaContext systems used before chunk contexts were batched: per chunk an Engine
    over the prefix, ``focus_on`` with the policy, ``materialize`` and one forward of WC + chunk."""
    cfg, base = system.cfg, system.base
    nll = torch.full((sample.n_targets,), float("nan"))
    top1 = torch.zeros(sample.n_targets, dtype=torch.bool)
    for s, e in chunk_bounds(sample.target_start, sample.target_end, cfg.chunk):
        h = e - s
        policy = system.make_policy()
        policy = getattr(policy, "policy", policy)  # BatchedLens -> the plain LensPolicy
        wc_cfg = WorkingContextConfig(w_max=w_max - h, recent_raw=cfg.recent_raw, position_mode=cfg.position_mode,
                                      recency=cfg.recency)
        engine = Engine(base, PrefixHistory(history, s), EngineConfig(wc=wc_cfg, k=BLOCK), policy=policy)
        if cfg.rounds and not isinstance(policy, RecencyFocus):
            engine.focus_on(sample.tokens[max(s - cfg.query_tokens, 0):s], rounds=cfg.rounds)
        m = engine.materialize()
        first = s if cfg.position_mode == "absolute" else m.position_ids.shape[0]
        chunk = sample.tokens[s:e]
        emb = torch.cat([m.inputs_embeds, base.embed(chunk)])[None]  # [1, T + h, d]
        pos = torch.cat([m.position_ids, torch.arange(first, first + h)])[None]
        with torch.no_grad():
            logits = base.forward(emb, pos, logits_to_keep=h + 1).logits[0, :-1].float()  # [h, V]
        o = s - sample.target_start
        nll[o:o + h] = torch.nn.functional.cross_entropy(logits, chunk, reduction="none")
        top1[o:o + h] = logits.argmax(-1) == chunk
    return nll, top1


@pytest.mark.parametrize("name", [*NAMES, "spy"])
def test_batched_scores_equal_the_engine_reference(tiny_base, checkpoints, samples, name):
    """Waves of 3 chunks, small forward batches (several flushes, mixed lengths), a history with LOD2 gists
    (4k tokens of history) and a perplexity sample whose first
    chunks see almost no history: every target's NLL equals the per-chunk Engine path."""
    from megacontext.bench.megacontext_systems import MegaContextSystemConfig

    docs = [TokenDoc("d0", samples[0].tokens[:600].repeat(8))]
    todo = (samples + far_recall_samples(docs, [4000], 1, passage_min=40, passage_max=40, lead=64)
            + perplexity_samples([TokenDoc("p", samples[0].tokens[:400])], 400))
    opts = {**checkpoints, "chunk": 32, "recent_raw": 64, "wave": 3, "batch_tokens": 700, "rounds": 3}
    if name == "spy":
        system = MegaContextSystem("spy", tiny_base, MeanPoolCompressor.from_base(tiny_base), _ExpandGists,
                                   MegaContextSystemConfig.from_dict(opts))
    else:
        system = build_system(name, tiny_base, opts)
    if name.startswith("megacontext-lensnet"):  # a trained-looking head, so the policy actually moves the focus
        torch.nn.init.normal_(system.make_policy().policy.net.head_out.weight, std=1.0)
    w_max = 224
    got = system.score(tiny_base, todo, w_max)
    histories = system._histories(todo)
    for sample, history, sc in zip(todo, histories, got, strict=True):
        nll, top1 = _engine_reference(system, sample, history, w_max)
        torch.testing.assert_close(sc.nll, nll, atol=1e-4, rtol=1e-4)
        assert torch.equal(sc.top1, top1)
    assert system.describe()["max_slots_read"][str(w_max)] <= w_max


def test_perplexity_runs_end_to_end_through_the_harness(tiny_base, checkpoints):
    g = torch.Generator().manual_seed(2)
    docs = [TokenDoc(f"d{i}", torch.randint(0, 128, (520,), generator=g)) for i in range(2)]
    tasks = {"books_ppl": perplexity_samples(docs, 520), "code_ppl": perplexity_samples(docs[:1], 300, "code_ppl")}
    opts = {**checkpoints, "chunk": 64, "recent_raw": 64}
    systems = [build_system(n, tiny_base, opts) for n in ("megacontext-recency", "megacontext-lensnet")]
    systems.append(Truncation(WindowConfig(chunk=64)))
    result = BenchResult()
    records = run_systems(tiny_base, systems, tasks, (192, 256), result)
    assert not result.skipped and len(records) == 3 * 2 * 2
    aggregate(records, (0, 128, 256, 1024), n_boot=20, seed=0, result=result)
    rows = {(r["task"], r["system"], r["w_max"], r["group"]): r for r in result.rows if r["metric"] == "nll"}
    for system in ("megacontext-recency", "megacontext-lensnet"):
        for w in (192, 256):
            assert {"0-128", "128-256", "256-1024", "all"} <= {k[3] for k in rows if k[:3] == ("books_ppl", system, w)}
            assert all(torch.isfinite(s.nll).all() for rec in records if rec.system == system for s in rec.scores)
    for system in systems[:2]:
        reads = system.describe()["max_slots_read"]
        assert 192 - 64 < reads["192"] <= 192 and reads["256"] <= 256
    # histories longer than the budget: the contexts differ from truncation's, early positions agree
    recency = next(r for r in records if r.system == "megacontext-recency" and r.task == "books_ppl" and r.w_max == 192)
    trunc = next(r for r in records if r.system == "truncation" and r.task == "books_ppl" and r.w_max == 192)
    torch.testing.assert_close(recency.scores[0].nll[:127], trunc.scores[0].nll[:127], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(recency.scores[0].nll[300:], trunc.scores[0].nll[300:], atol=1e-3)


def test_allocator_option_reaches_the_chunk_build(tiny_base, samples):
    """A system's ``allocator`` option is the one its refocus rounds use: thresholds nothing can pass turn a
    moving policy into the recency tiling, bit for bit."""
    from megacontext.bench.megacontext_systems import MegaContextSystemConfig
    from megacontext.wc import AllocatorConfig

    comp = MeanPoolCompressor.from_base(tiny_base)
    frozen = AllocatorConfig(tau_expand=1e9, tau_collapse=1e9, tau_deep=1e9)
    rec = build_system("meanpool-recency", tiny_base, {"chunk": 32, "recent_raw": 64})
    moving = MegaContextSystem("moving", tiny_base, comp, _ExpandGists,
                               MegaContextSystemConfig(chunk=32, recent_raw=64, rounds=2))
    still = MegaContextSystem("still", tiny_base, comp, _ExpandGists,
                              MegaContextSystemConfig.from_dict({"chunk": 32, "recent_raw": 64, "rounds": 2,
                                                                 "allocator": frozen.to_dict()}))
    a, b, c = (s.score(tiny_base, samples, 256) for s in (rec, moving, still))
    assert any(not torch.allclose(x.nll, y.nll) for x, y in zip(a, b, strict=True))  # the spy does move
    assert all(torch.equal(x.nll, z.nll) for x, z in zip(a, c, strict=True))
    assert still.describe()["allocator"]["tau_expand"] == 1e9


def test_tail512_fixes_its_raw_tail(tiny_base, checkpoints, samples):
    """``megacontext-tail512`` keeps 512 raw tokens whatever the suite passes, so a budget that cannot hold them
    is refused by name rather than silently shrinking the tail."""
    system = build_system("megacontext-tail512", tiny_base, {**checkpoints, "chunk": 32, "recent_raw": 64})
    assert system.describe()["recent_raw"] == 512 and system.describe()["focus"] == "lensnet"
    with pytest.raises(ValueError, match="megacontext-tail512: w_max=256 .* recent_raw=512"):
        system.score(tiny_base, samples, 256)
