"""Issue 14: payload checksums, refusal of non-finite gists and out-of-vocabulary ids at write, and the full
check (fsck) that finds damage anywhere."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from megacontext.tree import MegaContextTree, TreeConfig, TreeFormatError
from megacontext.tree.format import HEADER_SIZE
from megacontext.tree.integrity import check_tree
from tests.tree.tree_helpers import FP, VOCAB, make_compressor, stream

N = 40 * 1024 + 5 * 32 + 9  # 40 LOD2 groups (one LOD3 gist), some blocks and a tail


def build(root, n=N, **cfg) -> torch.Tensor:
    ids = stream(n)
    comp = make_compressor()
    config = TreeConfig(durable=False, batch_blocks=256, checksum_rows=64, **cfg)
    with MegaContextTree.create(root, comp.d_model, FP, comp, config=config, vocab_size=VOCAB) as t:
        t.append(ids)
    return ids


def read_everything(root) -> None:
    with MegaContextTree.open(root, readonly=True) as t:
        t.tokens(0, t.num_tokens)
        for level in range(1, t.num_levels):
            t.gists(level, 0, t.num_entries(level))


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["lod1_byte", "lod1_nan", "lod0_token", "lod2_byte", "lod3_byte"])
def test_payload_damage_is_detected_on_read_and_by_fsck(tmp_path, damage):
    clean = tmp_path / "clean"
    build(clean)
    assert check_tree(clean).ok
    root = tmp_path / damage
    shutil.copytree(clean, root)
    level = {"lod1_byte": 1, "lod1_nan": 1, "lod0_token": 0, "lod2_byte": 2, "lod3_byte": 3}[damage]
    path = root / f"LOD{level}.ctx"
    with MegaContextTree.open(clean, readonly=True) as t:
        row_bytes = t._files[level].header.row_bytes
    if damage == "lod1_nan":  # a gist in the middle of the file, not the verified-on-open tail
        with open(path, "r+b") as fh:
            fh.seek(HEADER_SIZE + 100 * row_bytes)
            fh.write(np.full(8, np.nan, np.float16).tobytes())
    elif damage == "lod0_token":
        with open(path, "r+b") as fh:
            fh.seek(HEADER_SIZE + 7 * row_bytes + 4 * 3)
            fh.write(np.int32(5).tobytes() if stream(N)[7 * 32 + 3] != 5 else np.int32(6).tobytes())
    else:
        _flip(path, HEADER_SIZE + 2)
    with pytest.raises(TreeFormatError, match="checksum"):
        read_everything(root)
    report = check_tree(root)
    assert not report.ok and any(path.name in p for p in report.problems)


def test_tail_damage_is_refused_on_open(tmp_path):
    root = tmp_path / "s"
    build(root)
    path = root / "LOD1.ctx"
    _flip(path, os.path.getsize(path) - 3)  # inside the last (partial) chunk
    with pytest.raises(TreeFormatError, match="checksum"):
        MegaContextTree.open(root, readonly=True)


def test_non_finite_gists_and_out_of_vocabulary_ids_are_refused_at_write(tmp_path):
    class NanCompressor:
        def __init__(self):
            self.inner = make_compressor()
            self.d_model, self.version = self.inner.d_model, "nan-test"

        def embed(self, ids):
            return self.inner.embed(ids)

        def compress(self, x, level):
            out = self.inner.compress(x, level)
            out[0, 0] = float("nan")
            return out

    comp = NanCompressor()
    with MegaContextTree.create(tmp_path / "nan", comp.d_model, FP, comp, vocab_size=VOCAB,
                                config=TreeConfig(durable=False)) as t:
        t.append(stream(100))
        with pytest.raises(ValueError, match="non-finite"):
            t.flush()
        assert t.num_committed_blocks == 0
        t.abort()
    comp = make_compressor()
    with MegaContextTree.create(tmp_path / "oov", comp.d_model, FP, comp, vocab_size=VOCAB,
                                config=TreeConfig(durable=False)) as t:
        t.append(stream(40))
        with pytest.raises(ValueError, match=f"vocabulary of {VOCAB}"):
            t.append([1, VOCAB])
        assert t.num_tokens == 40


def test_fsck_finds_out_of_vocabulary_ids_and_non_finite_gists_with_valid_checksums(tmp_path):
    """Bad values that a buggy writer put there (checksums computed over them) are still found by the full check."""
    from megacontext.tree import MeanPoolCompressor
    from megacontext.tree.checksum import SUM_HEADER, chunk_digest
    from megacontext.tree.layout import read_meta, write_meta

    root = tmp_path / "s"
    comp = MeanPoolCompressor(torch.randn(2 * VOCAB, 8, generator=torch.Generator().manual_seed(0)))
    ids = stream(4000)
    ids[3 * 32 + 3] = VOCAB + 7  # embeddable by this compressor, outside the vocabulary the store will record
    with MegaContextTree.create(root, 8, FP, comp, config=TreeConfig(durable=False, checksum_rows=64)) as t:
        t.append(ids)
    meta = read_meta(root)
    write_meta(root, {k: v for k, v in meta.items() if k not in ("format_version", "block_size", "checksum")}
               | {"vocab_size": VOCAB}, durable=False)
    with MegaContextTree.open(root, readonly=True) as t:  # a NaN gist in chunk 0 of LOD1, re-checksummed
        f = t._files[1]
        rb, c = f.header.row_bytes, f.header.checksum_rows
        chunk = bytearray(f._chunk_bytes(0))
    chunk[5 * rb: 5 * rb + 2] = np.float16(np.nan).tobytes()
    with open(root / "LOD1.ctx", "r+b") as fh:
        fh.seek(HEADER_SIZE)
        fh.write(bytes(chunk))
    with open(root / "LOD1.sum", "r+b") as fh:
        fh.seek(SUM_HEADER)
        fh.write(chunk_digest(bytes(chunk), 1, 0))
    report = check_tree(root)
    assert not report.ok
    assert any("vocabulary of 64" in p and "LOD0.ctx" in p for p in report.problems)
    assert any("non-finite" in p and "LOD1.ctx" in p and "[5]" in p for p in report.problems)
    assert not any("checksum" in p for p in report.problems)  # the checksums themselves were consistent
    del c


def test_stores_without_checksums_open_with_a_warning(tmp_path, caplog):
    root = tmp_path / "legacy"
    build(root, n=3000)
    from tests.tree.legacy import downgrade_to_v1

    downgrade_to_v1(root)
    with caplog.at_level("WARNING"), MegaContextTree.open(root, readonly=True) as t:
        assert t.num_tokens == 3000
    assert "no checksums" in caplog.text
    report = check_tree(root)
    assert report.ok and any("no checksums" in n for n in report.notes)
