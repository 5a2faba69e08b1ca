"""One commit of a tree: the gists it adds at every level, checked, then written in the crash-safe order.

:func:`plan_commit` is pure computation: the LOD1 gists of the new blocks and, level by level, the parents
their rows complete (a level's file may not exist yet: its first gist is part of the plan). Every new gist is
checked for non-finite values there, so a compressor fault refuses the commit before anything is written.
:func:`write_commit` then stages the rows in every touched file (creating a new level's file, and its
checksum file, first), fsyncs rows and checksums, and publishes the counts from the top level down to LOD0,
whose count is the commit point (see :mod:`megacontext.tree.store` for why that order is crash safe).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, MAX_LEVEL
from megacontext.tree.compressor import Compressor, gists_of_blocks, gists_of_groups
from megacontext.tree.format import Header
from megacontext.tree.layout import level_name
from megacontext.tree.level_file import LevelFile, fsync_dir


def to_rows(gists: Tensor) -> np.ndarray:
    """Gists in their storage torch dtype -> numpy rows as written to disk."""
    g = gists.contiguous()
    return (g.view(torch.int16) if g.dtype == torch.bfloat16 else g).numpy()


def check_finite(g: Tensor, level: int, first: int = 0) -> None:
    """Refuse gists [n, d] with a non-finite value, naming their rows (``first`` = the first row's index)."""
    bad = ~torch.isfinite(g.float()).all(dim=-1)  # [n]
    if bool(bad.any()):
        rows = (bad.nonzero().flatten() + first).tolist()
        raise ValueError(f"the compressor made non-finite LOD{level} gists (rows {rows[:5]}"
                         f"{' ...' if len(rows) > 5 else ''}); nothing was committed")


def plan_commit(files: list[LevelFile], compressor: Compressor, ids: np.ndarray, dtype: torch.dtype
                ) -> dict[int, Tensor]:
    """New gist rows per level (level -> [k, d] in ``dtype``) for committing blocks ``ids`` [n, 32] after the
    published rows of ``files`` (indexed by level; levels past the list have no file yet)."""
    new = {1: gists_of_blocks(compressor, torch.from_numpy(ids).long()).to(dtype)}  # [n, d]
    check_finite(new[1], 1, files[1].count)
    for lv in range(2, MAX_LEVEL + 1):  # parents completed by the new rows of the level below
        below = files[lv - 1] if lv - 1 < len(files) else None
        before = below.count if below is not None else 0
        after = before + new[lv - 1].shape[0]
        if after // BLOCK == before // BLOCK:
            break
        first = before // BLOCK * BLOCK  # start of the group the new rows continue
        old = below.read_tensor(first, before) if before > first else new[lv - 1][:0]
        pool = torch.cat([old, new[lv - 1]])[: after // BLOCK * BLOCK - first]  # [32m, d]
        new[lv] = gists_of_groups(compressor, pool, lv).to(dtype)  # [m, d]
        check_finite(new[lv], lv, before // BLOCK)
    return new


def write_commit(root, files: list[LevelFile], ids: np.ndarray, new: dict[int, Tensor], checksum_rows: int,
                 durable: bool) -> None:
    """Stage, sync and publish a planned commit (appends new level files to ``files``)."""
    created = False
    for lv in new:
        if lv >= len(files):
            h1 = files[1].header
            header = Header(lv, h1.dim, h1.dtype, 0, h1.fingerprint, h1.compressor_version, checksum_rows=checksum_rows)
            files.append(LevelFile.create(root / level_name(lv), header, durable))
            created = True
    if created and durable:
        fsync_dir(root)
    files[0].append_rows(ids)
    for lv, g in new.items():
        files[lv].append_rows(to_rows(g))
    touched = [files[0]] + [files[lv] for lv in new]
    for f in touched:
        f.sync()
    for f in reversed(touched):  # top level first, LOD0 last: its count is the commit point
        f.publish()
