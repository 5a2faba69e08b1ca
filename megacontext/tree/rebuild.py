"""Recomputing gist levels of a tree from the level below: ``rebuild`` (another base model or compressor, or
damaged gist files) and the upgrade of a store made before levels above LOD2 existed.

Levels are built one after the other into ``LODk.build.ctx`` files (each read back, verified, as the input
of the next), then renamed into place with their checksum files; a crash before the renames leaves the old
files in place, a crash between them leaves gist files that disagree, which reopening with ``rebuild=True``
repairs (gists are derived data; LOD0 is never rewritten except for its header's fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from megacontext.core.lod import BLOCK, MAX_LEVEL
from megacontext.tree.commit import check_finite, to_rows
from megacontext.tree.compressor import Compressor, gists_of_blocks, gists_of_groups
from megacontext.tree.format import Header
from megacontext.tree.history import gist_torch_dtype
from megacontext.tree.layout import BASE_LEVELS, level_name, needed_rows
from megacontext.tree.level_file import LevelFile, fsync_dir, sum_path


def build_levels(root: Path, below: LevelFile, first_level: int, n0: int, compressor: Compressor, fingerprint: str,
                 gist_dtype: str, checksum_rows: int, batch_blocks: int, durable: bool) -> list[Path]:
    """Compute the gist levels from ``first_level`` up that ``n0`` committed blocks need into ``LODk.build.ctx``
    files, reading ``below`` (the open level ``first_level - 1``; LOD0 for level 1); returns their paths."""
    dt = gist_torch_dtype(gist_dtype)
    built, paths = [], []
    try:
        for lv in range(first_level, MAX_LEVEL + 1):
            need = needed_rows(lv, n0)
            if lv >= BASE_LEVELS and need == 0:
                break
            path = root / f"LOD{lv}.build.ctx"
            h = Header(lv, compressor.d_model, gist_dtype, 0, fingerprint, compressor.version,
                       checksum_rows=checksum_rows)
            f = LevelFile.create(path, h, durable)
            built.append(f)
            paths.append(path)
            src = need if lv == 1 else need * BLOCK  # rows of the level below that feed this one
            for i in tqdm(range(0, src, batch_blocks), desc=f"build LOD{lv}", unit="batch",
                          disable=src <= batch_blocks):
                rows = below.read_tensor(i, min(i + batch_blocks, src))  # i is a multiple of 32
                g = (gists_of_blocks(compressor, rows) if lv == 1 else gists_of_groups(compressor, rows, lv)).to(dt)
                check_finite(g, lv, i if lv == 1 else i // BLOCK)
                f.append_rows(to_rows(g))
            f.sync()
            f.publish()
            below = f
        return paths
    finally:
        for f in built:
            f.close()


def install(root: Path, paths: list[Path], durable: bool) -> list[LevelFile]:
    """Rename built level files (and their checksum files) into place; returns them opened for writing."""
    levels = [int(p.name.split(".")[0][3:]) for p in paths]  # LOD3.build.ctx -> 3
    for p, lv in zip(paths, levels, strict=True):
        os.replace(sum_path(p), sum_path(root / level_name(lv)))
        os.replace(p, root / level_name(lv))
    if durable:
        fsync_dir(root)
    return [LevelFile.open(root / level_name(lv), lv, True, durable) for lv in levels]
