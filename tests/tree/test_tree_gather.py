"""gather_gists: equal to slicing gists() for any index set (unsorted, repeated, pending blocks), clear errors,
and the range-read fallback that reads only the rows asked for."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacontext.tree import InMemoryHistory, MegaContextTree
from megacontext.tree.history import gather_by_runs
from tests.tree.tree_helpers import FP, make_compressor, new_tree, stream

N_TOKENS = 3 * 1024 + 200  # 102 LOD1 gists, 3 LOD2 gists, a partial tail

_cache: dict[str, object] = {}


def _sources():
    """A committed store, a store whose last blocks are still pending, and the in-memory history (built once)."""
    if not _cache:
        ids, comp = stream(N_TOKENS), make_compressor()
        root = Path(tempfile.mkdtemp(prefix="mc-gather-"))
        with new_tree(root / "committed", comp) as t:
            t.append(ids)
        pending = new_tree(root / "pending", comp, batch_blocks=1024)  # nothing reaches a commit boundary
        pending.append(ids)
        _cache.update(root=root, ids=ids, committed=MegaContextTree.open(root / "committed", readonly=True),
                      pending_root=root / "pending", mem=InMemoryHistory(ids, comp, fingerprint=FP),
                      pending=pending)
    return _cache


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    if _cache:
        _cache["committed"].close()
        _cache["pending"].abort()
        shutil.rmtree(_cache["root"], ignore_errors=True)
        _cache.clear()


def _reference(level: int, idx: list[int]) -> torch.Tensor:
    mem = _sources()["mem"]
    full = mem.gists(level, 0, mem.num_entries(level))
    return full[torch.tensor(idx, dtype=torch.long)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from([1, 2]), data=st.data(), which=st.sampled_from(["committed", "mem"]))
def test_gather_equals_slicing(level, data, which):
    src = _sources()[which]
    n = src.num_entries(level)
    idx = data.draw(st.lists(st.integers(0, n - 1), max_size=40))  # unsorted, repeats allowed
    got = src.gather_gists(level, torch.tensor(idx, dtype=torch.long))
    assert got.shape == (len(idx), src.d_model) and got.dtype == src.gists(level, 0, 1).dtype
    assert torch.equal(got, _reference(level, idx))
    if idx:  # and the same as slicing that source itself
        assert torch.equal(got[0], src.gists(level, idx[0], idx[0] + 1)[0])


def test_gather_compresses_pending_blocks_on_read():
    src = _sources()["pending"]
    assert src.num_committed_blocks == 0  # every block is still waiting in RAM
    idx = torch.tensor([101, 0, 101, 57, 3])
    assert torch.equal(src.gather_gists(1, idx), _reference(1, idx.tolist()))
    assert src.num_committed_blocks == N_TOKENS // 32  # forced out, exactly as gists() does
    assert torch.equal(src.gather_gists(2, torch.tensor([2, 0])), _reference(2, [2, 0]))
    src.close()
    reopened = MegaContextTree.open(_sources()["pending_root"], readonly=True)
    assert torch.equal(reopened.gather_gists(1, idx), _reference(1, idx.tolist()))
    reopened.close()
    _sources()["pending"] = reopened  # the cleanup fixture aborts it (a no-op on a closed store)


def test_gather_accepts_other_int_dtypes_and_empty():
    for which in ("committed", "mem"):
        src = _sources()[which]
        assert torch.equal(src.gather_gists(1, torch.tensor([5, 2], dtype=torch.int32)), _reference(1, [5, 2]))
        assert src.gather_gists(2, torch.zeros(0, dtype=torch.long)).shape == (0, src.d_model)


@pytest.mark.parametrize("which", ["committed", "mem"])
def test_gather_errors_name_the_bad_value(which):
    src = _sources()[which]
    n1 = src.num_entries(1)
    with pytest.raises(ValueError, match="level=0"):
        src.gather_gists(0, torch.tensor([0]))
    with pytest.raises(ValueError, match="level=9"):
        src.gather_gists(9, torch.tensor([0]))
    with pytest.raises(IndexError, match="LOD3 gist index 0 is outside"):
        src.gather_gists(3, torch.tensor([0]))
    with pytest.raises(IndexError, match=f"index {n1} is outside \\[0, {n1}\\)"):
        src.gather_gists(1, torch.tensor([0, n1, 1]))
    with pytest.raises(IndexError, match="index -1 is outside"):
        src.gather_gists(1, torch.tensor([2, -1]))
    with pytest.raises(IndexError, match="LOD2 gist index 3 is outside \\[0, 3\\)"):
        src.gather_gists(2, torch.tensor([3]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        src.gather_gists(1, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        src.gather_gists(1, torch.tensor([[0, 1]]))


@given(st.lists(st.integers(0, 10_000), max_size=30))
def test_gather_by_runs_reads_only_what_is_asked(idx):
    table = torch.arange(10_001 * 2).view(-1, 2)
    reads: list[tuple[int, int]] = []

    def read_range(s: int, e: int) -> torch.Tensor:
        reads.append((s, e))
        return table[s:e]

    got = gather_by_runs(read_range, torch.tensor(idx, dtype=torch.long))
    assert torch.equal(got, table[torch.tensor(idx, dtype=torch.long)])
    assert sum(e - s for s, e in reads) == len(set(idx))  # never the span between far-apart indices
