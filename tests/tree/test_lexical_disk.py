"""Lexical index on disk: identical results across flush / reopen / streamed merge, narrow dtypes, bounded RAM
(persisted segments are maps), format-1 stores still open and are migrated, crash safety of persist."""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.tree.lexical import BM25Config, LexicalIndex, Segment, merge_segments, uint_dtype
from megacontext.tree.lexical_file import read_segment, write_merged
from megacontext.tree.lexical_store import LEX_DIR, LEX_VERSION, MANIFEST, StoredLexicalIndex, check_lexical
from tests.tree.test_lexical import brute_bm25


def _open(root: Path, ids: np.ndarray, committed: int, writable: bool = True, cfg: BM25Config | None = None):
    blocks = ids.reshape(-1, 32)
    return StoredLexicalIndex.open(root, lambda a, b: blocks[a:b], committed, writable, False, cfg)


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(n_blocks=st.integers(1, 90), vocab=st.sampled_from([5, 40, 70_000]), seed=st.integers(0, 10_000),
       steps=st.lists(st.tuples(st.integers(1, 12), st.booleans()), min_size=1, max_size=30),
       fanout=st.sampled_from([2, 4]), limit=st.one_of(st.none(), st.integers(0, 100)))
def test_flush_reopen_merge_keep_results(n_blocks, vocab, seed, steps, fanout, limit):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=n_blocks * 32)
    cfg = BM25Config(fanout=fanout, min_blocks_for_cutoff=8, max_df=0.5)
    queries = [rng.choice(ids, size=int(rng.integers(1, 30))) for _ in range(3)]
    queries.append(rng.integers(0, vocab + 3, size=20))
    ref = LexicalIndex(cfg)
    ref.add(0, ids.reshape(-1, 32))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        idx, notes = _open(root, ids, 0, cfg=cfg)
        at = 0
        for c, flush in steps * 10:
            if at >= n_blocks:
                break
            c = min(c, n_blocks - at)
            idx.add(at, ids[at * 32:(at + c) * 32])
            at += c
            if flush:
                idx.persist(at)  # committed prefix written, merged on disk, mapped
                assert all(idx._on_disk(s) for s in idx.segments)
            for q in queries:
                _same(idx.scores(q, limit), ref.scores(q, min(limit if limit is not None else at, at)))
        if at < n_blocks:
            idx.add(at, ids[at * 32:])
            at = n_blocks
        idx.persist(at)
        assert len(idx.segments) <= math.log(max(at, 1), fanout) + 1
        reopened, notes = _open(root, ids, at, writable=False)
        assert not notes and reopened.num_blocks == at == n_blocks
        for q in queries:
            want = brute_bm25(ids, q, cfg, limit)
            got = reopened.scores(q, limit)
            assert got[0].tolist() == sorted(want)
            np.testing.assert_allclose(got[1], [want[b] for b in got[0].tolist()], rtol=1e-5)
        problems, _, checked = check_lexical(root, lambda a, b: ids.reshape(-1, 32)[a:b], at)
        assert not problems and checked


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=5), big=st.booleans(), chunk=st.integers(1, 50),
       seed=st.integers(0, 1000))
def test_streamed_merge_equals_in_ram_merge(sizes, big, chunk, seed):
    rng = np.random.default_rng(seed)
    segs, at = [], 0
    for i, n in enumerate(sizes):  # mixed term dtypes: some segments uint16, some uint32
        hi = 70_000 if big and i % 2 else 30
        segs.append(Segment.build(at, rng.integers(0, hi, size=(n, 32))))
        at += n
    want = merge_segments(segs)
    with tempfile.TemporaryDirectory() as tmp:
        got = read_segment(Path(tmp), write_merged(Path(tmp), segs, durable=False, chunk=chunk), verify=True)
        for f in ("terms", "offsets", "tf"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
        np.testing.assert_array_equal(got.global_blocks(), want.global_blocks())
        assert got.terms.dtype == want.terms.dtype and got.blocks.dtype == np.uint16
        assert isinstance(got.blocks, np.memmap) and not got.blocks.flags.writeable


def test_narrow_dtypes():
    assert uint_dtype(65535) == np.uint16 and uint_dtype(65536) == np.uint32 and uint_dtype(2**32) == np.int64
    s = Segment.build(10, np.array([[65535] * 31 + [7]]))
    assert s.terms.dtype == np.uint16 and s.base == 10 and s.global_blocks().tolist() == [10, 10]
    s = Segment.build(0, np.array([[65536] * 32]))
    assert s.terms.dtype == np.uint32
    _, a, e = s.lookup(np.array([65536, 2**40, 0]))
    assert (e - a).tolist() == [1, 0, 0]  # ids past the dtype are absent, not wrapped


def _write_v1(root: Path, ids: np.ndarray, cuts: list[int]) -> None:
    """A lexical index as format 1 wrote it: int64 arrays with global block ids, ``seg_*`` names."""
    d = root / LEX_DIR
    d.mkdir(parents=True)
    entries, blocks = [], ids.reshape(-1, 32)
    for a, b in zip(cuts, cuts[1:], strict=False):
        s = Segment.build(a, blocks[a:b])
        arrays = [s.terms.astype("<i8"), s.offsets.astype("<i8"), s.global_blocks().astype("<i8"), s.tf]
        data = b"".join(x.tobytes() for x in arrays)
        name = f"seg_{a:012d}_{b:012d}.bin"
        (d / name).write_bytes(data)
        entries.append({"file": name, "first": a, "end": b, "terms": int(s.terms.shape[0]),
                        "postings": s.num_postings, "bytes": len(data), "crc": zlib.crc32(data)})
    body = {"format_version": 1, "num_blocks": cuts[-1], "bm25": BM25Config().to_dict(), "segments": entries}
    body["checksum"] = zlib.crc32(json.dumps(body, sort_keys=True).encode())
    (d / MANIFEST).write_text(json.dumps(body))


def test_format1_store_opens_and_migrates(tmp_path):
    ids = np.random.default_rng(3).integers(0, 500, size=32 * 60)
    _write_v1(tmp_path, ids, [0, 40, 50, 60])
    ref = LexicalIndex()
    ref.add(0, ids.reshape(-1, 32))
    q = ids[100:160]
    ro, notes = _open(tmp_path, ids, 60, writable=False)  # read as is
    assert not notes and ro.segments[0].blocks.dtype == np.int64 and ro.segments[0].base == 0
    _same(ro.scores(q), ref.scores(q))
    assert not check_lexical(tmp_path, lambda a, b: ids.reshape(-1, 32)[a:b], 60)[0]
    rw, notes = _open(tmp_path, ids, 60)  # a writer rewrites it in format 2
    assert not notes
    _same(rw.scores(q), ref.scores(q))
    body = json.loads((tmp_path / LEX_DIR / MANIFEST).read_text())
    assert body["format_version"] == LEX_VERSION == 2
    names = sorted(p.name for p in (tmp_path / LEX_DIR).iterdir())
    assert all(n.startswith("seg2_") for n in names if n != MANIFEST)
    assert all(s.blocks.dtype == np.uint16 for s in rw.segments)
    _same(_open(tmp_path, ids, 60, writable=False)[0].scores(q), ref.scores(q))


def test_crash_between_segments_and_manifest(tmp_path, monkeypatch):
    ids = np.random.default_rng(4).integers(0, 300, size=32 * 30)
    idx, _ = _open(tmp_path, ids, 0)
    idx.add(0, ids[: 32 * 10])
    idx.persist(10)
    idx.add(10, ids[32 * 10:])

    def crash(*a, **k):
        raise OSError("crash while writing the manifest")

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError):
        idx.persist(30)  # segment files written, manifest not replaced
    monkeypatch.undo()
    again, notes = _open(tmp_path, ids, 30)  # the old manifest (10 blocks) holds; caught up from LOD0
    assert not notes and again.num_blocks == 30
    ref = LexicalIndex()
    ref.add(0, ids.reshape(-1, 32))
    _same(again.scores(ids[:64]), ref.scores(ids[:64]))
    live = {e["file"] for e in json.loads((tmp_path / LEX_DIR / MANIFEST).read_text())["segments"]}
    assert {p.name for p in (tmp_path / LEX_DIR).glob("seg*")} == live  # orphans of the crash are gone


def test_rebuild_persists_in_steps(tmp_path, monkeypatch):
    import megacontext.tree.lexical_store as ls

    monkeypatch.setattr(ls, "_READ_CHUNK", 4)
    monkeypatch.setattr(ls, "_PERSIST_BLOCKS", 8)
    ids = np.random.default_rng(5).integers(0, 300, size=32 * 50)
    calls = []
    orig = StoredLexicalIndex.persist
    monkeypatch.setattr(StoredLexicalIndex, "persist", lambda self, c: (calls.append(c), orig(self, c)))
    idx, _ = _open(tmp_path, ids, 50)
    assert len(calls) >= 6 and calls[-1] == 50
    assert all(idx._on_disk(s) for s in idx.segments)  # nothing of the rebuild is left in RAM
