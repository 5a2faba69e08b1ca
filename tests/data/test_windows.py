"""Window sampler: inside one document, block-aligned, deterministic, split by document, disjoint shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.core.config import ConfigError
from megacontext.core.lod import BLOCK
from megacontext.data.token_cache import TokenCache
from megacontext.data.windows import WindowConfig, WindowSampler, doc_split


def synthetic_cache(lengths, domains=None) -> TokenCache:
    """In-memory cache whose token t of document i is (i * 997 + t) % 65521: any slice pins doc and offset."""
    lengths = [int(n) for n in lengths]
    domains = domains or ["books"] * len(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    tokens = np.concatenate([(i * 997 + np.arange(n)) % 65521 for i, n in enumerate(lengths)]).astype(np.uint16)
    docs = [{"doc_id": f"doc{i}", "domain": dom, "start": s, "length": n, "meta": {}}
            for i, (s, n, dom) in enumerate(zip(starts, lengths, domains, strict=True))]
    index = {"num_tokens": int(tokens.size), "docs": docs, "skipped": {}, "dtype": "uint16", "vocab_size": 65536}
    return TokenCache(Path("synthetic"), index, tokens)


def _expected(cache: TokenCache, doc: int, start: int, length: int) -> np.ndarray:
    return (doc * 997 + np.arange(start, start + length)) % 65521


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 700), min_size=1, max_size=12), context_blocks=st.integers(1, 6),
       horizon=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_windows_stay_inside_one_document_at_block_offsets(lengths, context_blocks, horizon, seed):
    cache = synthetic_cache(lengths)
    cfg = WindowConfig(context=context_blocks * BLOCK, horizon=horizon, seed=seed, split="all")
    long_enough = [i for i, n in enumerate(lengths) if n >= cfg.length]
    if not long_enough:
        with pytest.raises(ValueError, match="no windows"):
            WindowSampler(cache, cfg)
        return
    sampler = WindowSampler(cache, cfg)
    assert sampler.total_windows == sum((lengths[i] - cfg.length) // BLOCK + 1 for i in long_enough)
    for w, _ in zip(sampler, range(50), strict=False):
        assert w.doc_index in long_enough and w.start % BLOCK == 0
        assert w.start + cfg.length <= lengths[w.doc_index]
        assert w.tokens.shape == (cfg.length,)
        np.testing.assert_array_equal(w.tokens, _expected(cache, w.doc_index, w.start, cfg.length))
    # every candidate is reachable: the addressing covers exactly the valid (doc, offset) pairs
    docs, starts = sampler.locate(np.arange(sampler.num_windows))
    pairs = set(zip(docs.tolist(), starts.tolist(), strict=True))
    assert pairs == {(i, s) for i in long_enough for s in range(0, lengths[i] - cfg.length + 1, BLOCK)}


def test_stream_is_deterministic_and_batches_match_iteration():
    cache = synthetic_cache([500, 1000, 64, 2000])
    cfg = WindowConfig(context=128, horizon=16, seed=3, split="all")
    a = [(w.doc_index, w.start) for w, _ in zip(WindowSampler(cache, cfg), range(20), strict=False)]
    b = [(w.doc_index, w.start) for w, _ in zip(WindowSampler(cache, cfg), range(20), strict=False)]
    c = [(w.doc_index, w.start) for w, _ in zip(WindowSampler(cache, cfg.replace(seed=4)), range(20), strict=False)]
    assert a == b and a != c
    windows = [w for w, _ in zip(WindowSampler(cache, cfg), range(12), strict=False)]
    batches = WindowSampler(cache, cfg).batches(4)
    for k in range(3):
        batch = next(batches)
        assert batch.tokens.dtype == torch.int64 and batch.tokens.shape == (4, 144)
        for j in range(4):
            w = windows[4 * k + j]
            assert torch.equal(batch.tokens[j], torch.from_numpy(w.tokens)) and batch.domains[j] == w.domain


def test_split_is_by_document_and_disjoint():
    cache = synthetic_cache([400] * 200)
    cfg = WindowConfig(context=64, horizon=8, val_fraction=0.2)
    train, val = WindowSampler(cache, cfg), WindowSampler(cache, cfg.replace(split="val"))
    assert set(train.doc_indices.tolist()).isdisjoint(val.doc_indices.tolist())
    assert len(train.doc_indices) + len(val.doc_indices) == 200
    assert 20 <= len(val.doc_indices) <= 60  # ~20% of 200 documents
    assert all(doc_split(f"doc{i}", 0.2) == "val" for i in val.doc_indices.tolist())
    assert {w.doc_index for w, _ in zip(val, range(200), strict=False)} <= set(val.doc_indices.tolist())
    with pytest.raises(ValueError, match="no windows.*'val'"):
        WindowSampler(cache, cfg.replace(split="val", val_fraction=0.0))


def test_shards_are_disjoint_and_cover_all_windows():
    cache = synthetic_cache([300, 777, 1024, 90, 513])
    cfg = WindowConfig(context=64, horizon=32, split="all")
    full = WindowSampler(cache, cfg)
    every = set(zip(*(a.tolist() for a in full.locate(np.arange(full.num_windows))), strict=True))
    seen = []
    for rank in range(3):
        shard = full.shard(rank, 3)
        seen.append(set(zip(*(a.tolist() for a in shard.locate(np.arange(shard.num_windows))), strict=True)))
        drawn = {(w.doc_index, w.start) for w, _ in zip(shard, range(100), strict=False)}
        assert drawn <= seen[-1]
    assert seen[0] | seen[1] | seen[2] == every and sum(map(len, seen)) == len(every)
    with pytest.raises(ValueError, match="rank"):
        full.shard(3, 3)


def test_domain_filter_and_eval_sample():
    cache = synthetic_cache([600, 600, 600], domains=["books", "code", "dialogue"])
    cfg = WindowConfig(context=96, horizon=8, split="all", domains=("code",))
    sampler = WindowSampler(cache, cfg)
    assert sampler.doc_indices.tolist() == [1]
    sample = sampler.sample(10)
    assert len({w.start for w in sample}) == 10 and all(w.domain == "code" for w in sample)
    assert [(w.doc_index, w.start) for w in sample] == [(w.doc_index, w.start) for w in sampler.sample(10)]
    for w in sample:
        np.testing.assert_array_equal(w.tokens, _expected(cache, 1, w.start, cfg.length))
    assert len(sampler.sample(10_000)) == sampler.num_windows
    with pytest.raises(ValueError, match=r"domain\(s\) \['math'\]"):
        WindowSampler(cache, cfg.replace(domains=("math",)))


@pytest.mark.parametrize("kw,match", [({"context": 100}, "multiple of 32, got 100"), ({"horizon": 0}, "got 0"),
                                      ({"val_fraction": 1.0}, r"\[0, 1\), got 1.0"), ({"split": "test"}, "'test'")])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        WindowConfig(**kw)


def test_sampler_on_built_cache(tmp_path, tokenizer):
    from megacontext.data.corpora import Document

    docs = [Document(f"d{i}", "books", "the meeting was about the data and the model. " * (20 + 10 * i))
            for i in range(6)]
    cache = TokenCache.build(docs, tokenizer, tmp_path / "c", show_progress=False)
    sampler = WindowSampler(TokenCache.open(cache.path), WindowConfig(context=64, horizon=16, split="all"))
    batch = next(sampler.batches(3))
    assert batch.tokens.shape == (3, 80) and int(batch.tokens.max()) < len(tokenizer)
