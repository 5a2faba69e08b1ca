"""MegaContextTree: round trip, addressing, tail, batching, rebuild, refusal of mismatched stores, chunking."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacontext.core import lod as spans
from megacontext.tree import (
    HistorySource,
    InMemoryHistory,
    MegaContextTree,
    StoreBusyError,
    StoreMismatchError,
    TreeFormatError,
)
from megacontext.tree.layout import LEVEL_FILES, META
from tests.tree.tree_helpers import FP, CountingCompressor, make_compressor, new_tree, stream


def store_bytes(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in (*LEVEL_FILES, META)}


def test_round_trip_and_reopen(tmp_path):
    ids = stream(3 * 1024 + 100)
    comp = make_compressor()
    with new_tree(tmp_path / "s", comp) as t:
        t.append(ids)
        assert isinstance(t, HistorySource)
    t = MegaContextTree.open(tmp_path / "s", comp, FP, readonly=True)
    assert t.num_tokens == ids.numel() and t.d_model == comp.d_model and t.fingerprint == FP
    assert t.compressor_version == comp.version
    assert torch.equal(t.tokens(0, t.num_tokens), ids)
    assert torch.equal(t.tokens(45, 1000), ids[45:1000])
    assert torch.equal(t.tail_tokens(), ids[-(ids.numel() % 32):])
    assert t.num_entries(0) == t.num_entries(1) == ids.numel() // 32 and t.num_entries(2) == 3
    ref = InMemoryHistory(ids, comp, fingerprint=FP)  # same gists as the store, bit for bit
    for level in (1, 2):
        assert torch.equal(t.gists(level, 0, t.num_entries(level)), ref.gists(level, 0, ref.num_entries(level)))
    assert t.gists(1, 0, 3).dtype == torch.float16
    t.close()


def test_addressing_matches_spans(tmp_path):
    ids = stream(2 * 1024)
    comp = make_compressor()
    with new_tree(tmp_path / "s", comp) as t:
        t.append(ids)
        for index in (0, 5, 63):
            start, end = spans.token_span(1, index)
            expect = comp.compress(comp.embed(ids[start:end].view(1, 32)), 1).half()
            assert torch.equal(t.gists(1, index, index + 1), expect)
            assert torch.equal(t.blocks(index, index + 1)[0], ids[start:end])
        level, children = spans.children(2, 1)
        kids = t.gists(level, children.start, children.stop)  # LOD2 gist 1 = compress(its 32 LOD1 children)
        assert torch.equal(t.gists(2, 1, 2), comp.compress(kids.float().unsqueeze(0), 2).half())
        assert spans.parent(1, 40) == (2, 1)


def test_tail_is_readable_and_persisted(tmp_path):
    ids = stream(100)
    t = new_tree(tmp_path / "s")
    t.append(ids[:10])
    assert t.num_tokens == 10 and t.num_entries(1) == 0 and torch.equal(t.tail_tokens(), ids[:10])
    t.append(ids[10:70])
    assert torch.equal(t.tokens(0, 70), ids[:70]) and torch.equal(t.tail_tokens(), ids[64:70])
    assert t.gists(1, 0, 2).shape == (2, 8)  # pending blocks are compressed on demand
    t.close()
    t = MegaContextTree.open(tmp_path / "s", make_compressor(), FP)
    assert torch.equal(t.tail_tokens(), ids[64:70])
    t.append(ids[70:])
    assert torch.equal(t.tokens(0, 100), ids) and t.num_entries(1) == 3
    t.close()


def test_batched_compression_never_recomputes(tmp_path):
    comp = CountingCompressor(make_compressor())
    t = new_tree(tmp_path / "s", comp, batch_blocks=1024)
    ids = stream(100_000)
    for i in range(0, ids.numel(), 7_000):  # chunking unrelated to the batch size
        t.append(ids[i:i + 7000])
    t.close()
    n1 = 100_000 // 32
    assert sum(comp.calls[1]) == n1 and sum(comp.calls[2]) == n1 // 32  # every gist computed exactly once
    assert sum(comp.calls[3]) == n1 // 1024 and 4 not in comp.calls  # LOD3 appeared at 32,768 tokens
    assert len(comp.calls[1]) == -(-n1 // 1024) and max(comp.calls[1]) == 1024
    comp2 = CountingCompressor(make_compressor())
    t = MegaContextTree.open(tmp_path / "s", comp2, FP)
    t.gists(1, 0, 10)
    t.close()
    assert not any(comp2.calls.values())  # reopening computes nothing


def test_mismatches_refused_unless_rebuild(tmp_path):
    ids = stream(1100)
    with new_tree(tmp_path / "s") as t:
        t.append(ids)
    other = make_compressor(seed=1)
    with pytest.raises(StoreMismatchError) as e:
        MegaContextTree.open(tmp_path / "s", make_compressor(), "other-fp")
    assert e.value.field == "fingerprint" and "LOD0.ctx" in e.value.path
    with pytest.raises(StoreMismatchError) as e:
        MegaContextTree.open(tmp_path / "s", other, FP)
    assert e.value.field == "compressor_version" and "LOD1.ctx" in e.value.path
    with pytest.raises(StoreMismatchError, match="dim"):
        MegaContextTree.open(tmp_path / "s", make_compressor(d=16), FP)
    # rebuild: new base fingerprint + new compressor (new width); gists equal a fresh build
    wide = make_compressor(seed=2, d=16)
    with MegaContextTree.open(tmp_path / "s", wide, "new-fp", rebuild=True) as t:
        assert (t.fingerprint, t.d_model, t.compressor_version) == ("new-fp", 16, wide.version)
        ref = InMemoryHistory(ids, wide)
        assert torch.equal(t.gists(1, 0, 34), ref.gists(1, 0, 34)) and torch.equal(t.gists(2, 0, 1), ref.gists(2, 0, 1))
        assert torch.equal(t.tokens(0, 1100), ids)
    MegaContextTree.open(tmp_path / "s", wide, "new-fp").close()  # now opens without rebuild


def test_rebuild_method_and_interrupted_rebuild(tmp_path):
    ids = stream(2100)
    with new_tree(tmp_path / "s") as t:
        t.append(ids)
        t.rebuild(make_compressor(seed=5))
    # simulate a crash between the two renames of a rebuild: LOD2 from another compressor
    with new_tree(tmp_path / "o", make_compressor(seed=6)) as o:
        o.append(ids)
    for name in ("LOD2.ctx", "LOD2.sum"):  # the rename of a level file goes with its checksum file
        shutil.copy(tmp_path / "o" / name, tmp_path / "s" / name)
    with pytest.raises(TreeFormatError) as e:
        MegaContextTree.open(tmp_path / "s", make_compressor(seed=5), FP)
    assert e.value.field == "compressor_version" and e.value.path.endswith("LOD2.ctx")
    with MegaContextTree.open(tmp_path / "s", make_compressor(seed=5), FP, rebuild=True) as t:
        assert torch.equal(t.gists(2, 0, 2), InMemoryHistory(ids, make_compressor(seed=5)).gists(2, 0, 2))


def test_foreign_level_file_refused(tmp_path):
    with new_tree(tmp_path / "a") as a:
        a.append(stream(640))
    with new_tree(tmp_path / "b", make_compressor(d=16)) as b:
        b.append(stream(640))
    shutil.copy(tmp_path / "b" / "LOD1.ctx", tmp_path / "a" / "LOD1.ctx")
    with pytest.raises(TreeFormatError) as e:
        MegaContextTree.open(tmp_path / "a", readonly=True)
    assert e.value.field == "dim" and e.value.path.endswith("LOD1.ctx")
    shutil.copy(tmp_path / "b" / "LOD0.ctx", tmp_path / "a" / "LOD1.ctx")  # a level-0 file named LOD1
    with pytest.raises(TreeFormatError, match="level"):
        MegaContextTree.open(tmp_path / "a", readonly=True)
    (tmp_path / "a" / META).write_text("{not json")
    with pytest.raises(TreeFormatError, match="meta.json"):
        MegaContextTree.open(tmp_path / "a", readonly=True)


def test_single_writer_lock_and_readonly(tmp_path):
    t = new_tree(tmp_path / "s")
    with pytest.raises(StoreBusyError):
        MegaContextTree.open(tmp_path / "s", make_compressor())
    r = MegaContextTree.open(tmp_path / "s", readonly=True)  # readers do not lock
    with pytest.raises(PermissionError):
        r.append([1, 2])
    r.close()
    t.close()
    MegaContextTree.open(tmp_path / "s", make_compressor()).close()
    with pytest.raises(FileExistsError):
        new_tree(tmp_path / "s")


def test_bad_inputs(tmp_path):
    with new_tree(tmp_path / "s") as t:
        with pytest.raises(ValueError, match="token id -1"):
            t.append([-1])
        with pytest.raises(TypeError):
            t.append(torch.zeros(3))
        t.append(stream(64))
        with pytest.raises(IndexError):
            t.tokens(0, 65)
        with pytest.raises(IndexError):
            t.gists(1, 1, 3)
        with pytest.raises(ValueError, match="level"):
            t.gists(0, 0, 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 2600), cuts=st.lists(st.integers(0, 2600), max_size=12), reads=st.booleans(),
       gist_dtype=st.sampled_from(["float16", "bfloat16"]))
def test_store_independent_of_chunking(n, cuts, reads, gist_dtype):
    ids = stream(n, seed=n)
    bounds = sorted({0, n, *(c % (n + 1) for c in cuts)})
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        with new_tree(root / "ref", batch_blocks=32, gist_dtype=gist_dtype) as ref:
            ref.append(ids)
        with new_tree(root / "chunked", batch_blocks=32, gist_dtype=gist_dtype) as t:
            for a, b in zip(bounds, bounds[1:], strict=False):
                t.append(ids[a:b])
                if reads and t.num_entries(1):
                    t.gists(1, t.num_entries(1) - 1, t.num_entries(1))  # forces early, unaligned commits
        if not reads:
            assert store_bytes(root / "ref") == store_bytes(root / "chunked")
        else:  # batches differ, but the mean-pool compressor is row-independent: same values
            for name in LEVEL_FILES:
                assert (root / "ref" / name).read_bytes() == (root / "chunked" / name).read_bytes()
        meta = json.loads((root / "chunked" / META).read_text())
        assert meta["num_blocks"] == n // 32 and meta["tail"] == ids[n // 32 * 32:].tolist()


def test_in_memory_history_api():
    ids = stream(1100)
    h = InMemoryHistory(ids, make_compressor(), fingerprint=FP, gist_dtype="float32", batch_blocks=7)
    assert isinstance(h, HistorySource)
    assert h.num_entries(1) == 34 and h.num_entries(2) == 1 and torch.equal(h.tail_tokens(), ids[34 * 32:])
    assert h.gists(1, 0, 34).dtype == torch.float32 and torch.equal(h.tokens(3, 9), ids[3:9])
    assert np.isclose(h.gists(1, 0, 34).norm(dim=-1), make_compressor().target_norm, rtol=1e-4).all()
