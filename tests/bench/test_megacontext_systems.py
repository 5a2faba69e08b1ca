"""MegaContext bench systems on a tiny random base with tiny random GistNet / LensNet checkpoints."""

from __future__ import annotations

import pytest
import torch

from megacontext.bench.megacontext_systems import MegaContextSystem, PrefixHistory
from megacontext.bench.registry import SystemUnavailable, build_system
from megacontext.bench.scoring import score_chunked
from megacontext.bench.tasks import TokenDoc, far_recall_samples, passkey_samples
from megacontext.bench.truncation import FullAttention, WindowConfig
from megacontext.gistnet.model import GistNet, GistNetConfig
from megacontext.lensnet.model import LensNet, LensNetConfig
from megacontext.tree import InMemoryHistory, MeanPoolCompressor

NAMES = ("megacontext-recency", "megacontext-lensnet", "megacontext-lexical", "meanpool-recency")


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


def test_missing_checkpoint_is_unavailable(tiny_base, tmp_path):
    with pytest.raises(SystemUnavailable, match="GistNet checkpoint"):
        build_system("megacontext-recency", tiny_base, {"gistnet": str(tmp_path / "nope")})


def test_budget_too_small_for_chunk_is_a_clear_error(tiny_base, samples):
    system = build_system("meanpool-recency", tiny_base, {"chunk": 32, "recent_raw": 128})
    with pytest.raises(ValueError, match="w_max=160"):
        system.score(tiny_base, samples, 160)


def test_prefix_history_hides_the_future(tiny_base):
    hist = InMemoryHistory(torch.arange(100) % 128, MeanPoolCompressor.from_base(tiny_base))
    view = PrefixHistory(hist, 70)
    assert view.num_entries(1) == 2 and view.gists(1, 0, 2).shape[0] == 2
    with pytest.raises(ValueError, match="not complete"):
        view.gists(1, 0, 3)
    with pytest.raises(ValueError, match="past the prefix"):
        view.tokens(60, 71)


def test_skips_perplexity_tasks(tiny_base):
    assert {"books_ppl", "code_ppl"} <= build_system("meanpool-recency", tiny_base).skip_tasks
    assert isinstance(build_system("meanpool-recency", tiny_base), MegaContextSystem)
