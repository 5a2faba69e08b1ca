"""Levels above LOD2 in the tree: created by the commit that makes their first gist, equal to a fresh
in-memory build, and added to stores made before they existed (format 1) on their first writable open."""

from __future__ import annotations

import pytest
import torch

from megacontext.tree import InMemoryHistory, MegaContextTree, TreeFormatError
from megacontext.tree.integrity import check_tree
from tests.tree.legacy import downgrade_to_v1
from tests.tree.tree_helpers import FP, make_compressor, new_tree, stream

N = 40 * 1024 + 77  # one LOD3 gist (32,768 tokens) and change


def _same_as_reference(t: MegaContextTree, ids: torch.Tensor) -> None:
    ref = InMemoryHistory(ids, make_compressor())
    assert t.num_levels == 4 and t.num_entries(3) == 1 and t.num_entries(4) == 0
    for level in (1, 2, 3):
        k = t.num_entries(level)
        assert torch.equal(t.gists(level, 0, k), ref.gists(level, 0, k))


def test_lod3_appears_with_its_first_gist(tmp_path):
    ids = stream(N)
    with new_tree(tmp_path / "s", batch_blocks=256) as t:
        t.append(ids[:32_767])
        t.flush()
        assert t.num_levels == 3 and not (tmp_path / "s" / "LOD3.ctx").exists()
        t.append(ids[32_767:])
    with MegaContextTree.open(tmp_path / "s", readonly=True) as t:
        _same_as_reference(t, ids)
    assert check_tree(tmp_path / "s").ok


def test_a_store_made_before_lod3_gets_it_on_its_first_writable_open(tmp_path):
    ids = stream(N)
    root = tmp_path / "old"
    with new_tree(root, batch_blocks=256) as t:
        t.append(ids)
    downgrade_to_v1(root)  # LOD0-2 without checksums, meta.json version 1
    with pytest.raises(TreeFormatError, match="open it once for writing"):
        MegaContextTree.open(root, readonly=True)
    with MegaContextTree.open(root, make_compressor(), FP) as t:
        assert any("added LOD3" in note for note in t.recovery)
        _same_as_reference(t, ids)
        t.append(stream(40_000, seed=1)[:2000])  # and it keeps growing
    with MegaContextTree.open(root, readonly=True) as t:
        assert t.num_tokens == N + 2000
    report = check_tree(root)
    assert report.ok and any("no checksums" in n for n in report.notes)


def test_a_deleted_upper_level_is_damage_in_a_current_store(tmp_path):
    root = tmp_path / "s"
    with new_tree(root, batch_blocks=256) as t:
        t.append(stream(N))
    (root / "LOD3.ctx").unlink()
    with pytest.raises(TreeFormatError, match="LOD3.ctx: bad file: missing, but LOD0 commits"):
        MegaContextTree.open(root, make_compressor(), FP)
    assert not check_tree(root).ok
    with MegaContextTree.open(root, make_compressor(), FP, rebuild=True) as t:  # gists are derived: rebuilt
        _same_as_reference(t, stream(N))
