"""Lexical index: BM25 against a brute-force scan, aggregation up the levels, persistence and crash recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig
from megacontext.tree.lexical import BM25Config, LexicalIndex, entry_scores, merge_segments
from megacontext.tree.lexical_store import LEX_DIR, MANIFEST, check_lexical


def brute_bm25(ids: np.ndarray, query, cfg: BM25Config, limit: int | None = None) -> dict[int, float]:
    blocks = ids.reshape(-1, 32)[: limit]
    n = blocks.shape[0]
    q, qtf = np.unique([t for t in query if t >= 0], return_counts=True)
    out: dict[int, float] = {}
    for term, c in zip(q.tolist(), qtf.tolist(), strict=True):
        df = sum(1 for b in blocks if term in b)
        if df == 0 or df > cfg.max_postings or (n >= cfg.min_blocks_for_cutoff and df > cfg.max_df * n):
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        qw = c * (cfg.k3 + 1) / (c + cfg.k3)
        for i, b in enumerate(blocks):
            tf = int((b == term).sum())
            if tf:
                out[i] = out.get(i, 0.0) + qw * idf * tf * (cfg.k1 + 1) / (tf + cfg.k1)
    return out


@settings(max_examples=40, deadline=None)
@given(n_blocks=st.integers(1, 70), vocab=st.integers(2, 60), chunks=st.lists(st.integers(1, 9), min_size=1,
       max_size=12), seed=st.integers(0, 10_000), max_df=st.sampled_from([1.0, 0.3]),
       limit=st.one_of(st.none(), st.integers(0, 80)), max_postings=st.sampled_from([8192, 5]))
def test_bm25_matches_brute_force(n_blocks, vocab, chunks, seed, max_df, limit, max_postings):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=n_blocks * 32)
    cfg = BM25Config(max_df=max_df, min_blocks_for_cutoff=8, fanout=2, max_postings=max_postings)
    idx = LexicalIndex(cfg)
    at = 0
    for c in chunks * 10:  # arbitrary batch sizes: segments and merges must not change any score
        if at >= n_blocks:
            break
        c = min(c, n_blocks - at)
        idx.add(at, ids[at * 32:(at + c) * 32].reshape(c, 32))
        at += c
    idx.add(at, ids[at * 32:].reshape(-1, 32))
    query = rng.integers(-1, vocab + 5, size=int(rng.integers(0, 40))).tolist()
    blocks, scores = idx.scores(query, limit_block=limit)
    want = brute_bm25(ids, query, cfg, limit)
    assert blocks.tolist() == sorted(want)
    np.testing.assert_allclose(scores, [want[b] for b in blocks.tolist()], rtol=1e-5)
    assert len(idx.segments) <= math.log2(max(n_blocks, 1)) + 1  # tiered merging keeps segments few


def test_merge_matches_single_build():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(40, 32))
    a, b = LexicalIndex(BM25Config(fanout=100)), LexicalIndex(BM25Config(fanout=100))
    a.add(0, ids)
    for i in range(0, 40, 7):
        b.add(i, ids[i:i + 7])
    m = merge_segments(b.segments)
    s = a.segments[0]
    for f in ("terms", "offsets", "blocks", "tf"):
        np.testing.assert_array_equal(getattr(m, f), getattr(s, f))


def test_add_out_of_order_refused():
    idx = LexicalIndex()
    idx.add(0, np.zeros((2, 32), np.int64))
    with pytest.raises(ValueError, match="in order"):
        idx.add(5, np.zeros((1, 32), np.int64))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_entry_scores_aggregate_max_sum_best(seed):
    rng = np.random.default_rng(seed)
    n_blocks = 32 * 3 + int(rng.integers(0, 40))
    blocks = np.sort(rng.choice(n_blocks, size=int(rng.integers(0, 30)), replace=False)).astype(np.int64)
    scores = rng.random(blocks.shape[0]).astype(np.float32) + 0.1
    # a tiling: LOD2 entries for the first k groups of 32 blocks, then LOD1/LOD0 mixed
    k = int(rng.integers(0, 4))
    levels = [2] * k + rng.integers(0, 2, size=n_blocks - 32 * k).tolist()
    indices = list(range(k)) + list(range(32 * k, n_blocks))
    mx, sm, best = entry_scores(blocks, scores, np.array(levels), np.array(indices))
    dense = np.zeros(n_blocks, np.float32)
    dense[blocks] = scores
    for e, (lv, ix) in enumerate(zip(levels, indices, strict=True)):
        lo, hi = (ix * 32, ix * 32 + 32) if lv == 2 else (ix, ix + 1)
        part = dense[lo:hi]
        assert sm[e] == pytest.approx(part.sum(), rel=1e-5)
        assert mx[e] == pytest.approx(part.max())
        assert best[e] == (lo + int(part.argmax()) if part.max() > 0 else -1)


COMP = MeanPoolCompressor(torch.randn(64, 8))


def _store(path, **cfg):
    return MegaContextTree.create(path, 8, "fp", COMP, vocab_size=64,
                                  config=TreeConfig(batch_blocks=32, commit_seconds=1e9, **cfg))


def test_store_persists_and_reopens(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, size=32 * 50 + 7)
    with _store(tmp_path / "s") as t:
        for i in range(0, ids.size, 101):
            t.append(ids[i:i + 101])
            if i % 303 == 0:
                t.flush()
        q = ids[-40:]
        want = t.lexical.scores(q)
    t2 = MegaContextTree.open(tmp_path / "s", readonly=True)
    got = t2.lexical.scores(q)
    assert t2.lexical.num_blocks == 50 and not t2.recovery
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1])
    fresh = LexicalIndex(t2.lexical.cfg)
    fresh.add(0, ids[: 50 * 32].reshape(50, 32))
    np.testing.assert_allclose(fresh.scores(q)[1], want[1], rtol=1e-6)
    problems, _, checked = check_lexical(tmp_path / "s", t2._files[0].read, 50)
    assert not problems and checked
    t2.close()


def test_crash_before_flush_and_damage_recover(tmp_path):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 64, size=32 * 40)
    t = _store(tmp_path / "s")
    t.append(ids[: 32 * 20])
    t.flush()
    t.append(ids[32 * 20:])  # committed by batch (32 blocks) but the index is persisted only by flush
    t.abort()  # crash: LOD0 may be ahead of the index; reopening catches up from LOD0
    t = MegaContextTree.open(tmp_path / "s", COMP)
    n = t.num_committed_blocks
    assert t.lexical.num_blocks == n
    fresh = LexicalIndex(t.lexical.cfg)
    fresh.add(0, ids[: n * 32].reshape(n, 32))
    np.testing.assert_allclose(t.lexical.scores(ids[:50])[1], fresh.scores(ids[:50])[1], rtol=1e-6)
    t.close()
    man = tmp_path / "s" / LEX_DIR / MANIFEST
    man.write_text(man.read_text().replace('"num_blocks": ', '"num_blocks": 1'))  # damaged manifest
    problems, _, _ = check_lexical(tmp_path / "s", lambda a, b: ids.reshape(-1, 32)[a:b], n)
    assert problems
    t = MegaContextTree.open(tmp_path / "s", COMP)
    assert any("rebuilt" in r for r in t.recovery) and t.lexical.num_blocks == n
    np.testing.assert_allclose(t.lexical.scores(ids[:50])[1], fresh.scores(ids[:50])[1], rtol=1e-6)
    t.close()
    assert not check_lexical(tmp_path / "s", lambda a, b: ids.reshape(-1, 32)[a:b], n)[0]


def test_lexical_off(tmp_path):
    with _store(tmp_path / "s", lexical=False) as t:
        t.append(np.arange(64) % 64)
        assert t.lexical is None
    assert not (tmp_path / "s" / LEX_DIR).exists()
    with MegaContextTree.open(tmp_path / "s", readonly=True) as t:
        assert t.lexical is None  # no O(history) build for a read-only opener
    with MegaContextTree.open(tmp_path / "s", COMP) as t:  # a writer adds the index of an older store
        assert t.lexical.num_blocks == 2
    assert (tmp_path / "s" / LEX_DIR / MANIFEST).is_file()
