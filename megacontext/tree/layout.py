"""Store directory layout: file names, ``meta.json``, the writer lock, and the cross-file checks of ``open``.

A store directory holds one level file per level the history has reached (``LOD0.ctx``, ``LOD1.ctx``,
``LOD2.ctx`` always; ``LOD3.ctx``, ``LOD4.ctx``, ... created by the commit that makes their first gist; see
:mod:`megacontext.tree.format`), a checksum file beside each version-2 level file (``LODk.sum``, see
:mod:`megacontext.tree.checksum`), ``meta.json`` and ``LOCK``. ``meta.json`` is a summary plus the partial
tail; it is replaced atomically (write temp, fsync, rename) and carries a CRC-32 so a damaged tail is refused
rather than read as tokens. Level-file headers are authoritative for counts, widths, fingerprint and
compressor version; the checks here make the files agree with each other and with the caller's base model
and compressor.

``meta.json`` versions: 2 (this code) records the vocabulary size, the checksum chunk size and that levels
above 2 are kept; version 1 (stores made before that) is read too, and such a store gets its missing upper
levels built the first time it is opened for writing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import zlib
from pathlib import Path

from megacontext.core.lod import BLOCK, MAX_LEVEL
from megacontext.tree.compressor import Compressor
from megacontext.tree.format import TreeFormatError
from megacontext.tree.level_file import LevelFile, fsync_dir

log = logging.getLogger(__name__)

BASE_LEVELS = 3  # LOD0, LOD1 and LOD2 files exist from creation on
LEVEL_FILES = tuple(f"LOD{lv}.ctx" for lv in range(BASE_LEVELS))
META = "meta.json"
LOCK = "LOCK"
META_VERSION = 2
READABLE_META = (1, 2)


def level_name(level: int) -> str:
    return f"LOD{level}.ctx"


def needed_rows(level: int, lod0_rows: int) -> int:
    """Rows level ``level`` must hold for ``lod0_rows`` committed blocks (LOD1: one per block; LOD``l``: one per
    ``32 ** (l - 1)`` blocks)."""
    return lod0_rows if level <= 1 else lod0_rows // BLOCK ** (level - 1)


class StoreMismatchError(TreeFormatError):
    """A sound store made for another base model or compressor; reopen with ``rebuild=True`` to convert it."""


class StoreBusyError(RuntimeError):
    """Another process has the store open for writing."""


def write_meta(root: Path, fields: dict, durable: bool) -> None:
    meta = {"format_version": META_VERSION, "block_size": BLOCK, **fields}
    meta["checksum"] = _meta_checksum(meta)
    tmp = root / (META + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, root / META)
    if durable:
        fsync_dir(root)


def existing_levels(root: Path) -> int:
    """How many consecutive level files (from LOD0) the directory holds."""
    n = 0
    while n <= MAX_LEVEL and (root / level_name(n)).is_file():
        n += 1
    return n


def open_gist_files(root: Path, lod0: LevelFile, compressor: Compressor | None, fingerprint: str | None,
                    readonly: bool, durable: bool) -> list[LevelFile]:
    """Open and cross-check the gist level files present (LOD1, LOD2 and any above); the caller decides about
    levels that are missing."""
    if fingerprint is not None and lod0.header.fingerprint != fingerprint:
        raise StoreMismatchError(lod0.path, "fingerprint",
                                 f"store made for base model {lod0.header.fingerprint!r}, the loaded base model is "
                                 f"{fingerprint!r}; reopen with rebuild=True to recompute its gists")
    if compressor is not None and compressor.d_model != lod0.header.dim:
        raise StoreMismatchError(lod0.path, "dim", f"store d_model={lod0.header.dim}, compressor d_model="
                                 f"{compressor.d_model}; reopen with rebuild=True to recompute its gists")
    out: list[LevelFile] = []
    try:
        for lv in range(1, max(existing_levels(root), BASE_LEVELS)):
            f = LevelFile.open(root / level_name(lv), lv, not readonly, durable)
            out.append(f)
            h, h0 = f.header, lod0.header
            if h.dim != h0.dim:
                raise TreeFormatError(f.path, "dim", f"{h.dim}; LOD0 of this store says {h0.dim}")
            if h.fingerprint != h0.fingerprint:
                raise TreeFormatError(f.path, "fingerprint", f"{h.fingerprint!r}; LOD0 says {h0.fingerprint!r}")
            if lv >= 2 and (h.dtype, h.compressor_version) != (out[0].header.dtype, out[0].header.compressor_version):
                raise TreeFormatError(f.path, "compressor_version", f"{h.compressor_version!r} ({h.dtype}) differs "
                                      f"from LOD1's {out[0].header.compressor_version!r} ({out[0].header.dtype}); "
                                      "an interrupted rebuild: reopen with rebuild=True")
            if compressor is not None and h.compressor_version != compressor.version:
                raise StoreMismatchError(f.path, "compressor_version",
                                         f"gists made by {h.compressor_version!r}, compressor is "
                                         f"{compressor.version!r}; reopen with rebuild=True to recompute them")
    except BaseException:
        for f in out:
            f.close()
        raise
    return out


def reconcile(files: list[LevelFile]) -> list[str]:
    """Trim gist rows published by a commit whose LOD0 count never was; refuse gists that are missing.
    Returns what was trimmed (for the recovery report)."""
    n0, notes = files[0].count, []
    for lv, f in enumerate(files[1:], start=1):
        need = needed_rows(lv, n0)
        if f.count < need:
            raise TreeFormatError(f.path, "entry_count", f"{f.count} gists but LOD0 commits {n0} blocks, "
                                  f"which need {need}; the store is damaged (gists can be recomputed with "
                                  "rebuild=True)")
        if f.count > need:
            log.info("%s: dropping %d gists of an interrupted commit", f.path, f.count - need)
            notes.append(f"{f.path.name}: dropped {f.count - need} gists of an interrupted commit")
            f.trim(need)
    return notes


def _meta_checksum(meta: dict) -> int:
    """CRC-32 of the canonical JSON of every field but the checksum: a damaged tail must not be read as tokens."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def read_meta(root: Path) -> dict:
    path = root / META
    if not path.is_file():
        raise TreeFormatError(path, "file", f"missing; {root} is not a MegaContext store")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TreeFormatError(path, "json", str(e)) from e
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_META:
        raise TreeFormatError(path, "format_version", f"{version!r}; this code reads versions {READABLE_META}")
    if meta.get("checksum") != _meta_checksum(meta):
        raise TreeFormatError(path, "checksum", f"stored {meta.get('checksum')!r} != computed {_meta_checksum(meta)}")
    tail = meta.get("tail", [])
    if not isinstance(tail, list) or len(tail) >= BLOCK or not all(isinstance(t, int) and t >= 0 for t in tail):
        raise TreeFormatError(path, "tail", f"expected a list of < {BLOCK} token ids, got {str(tail)[:80]}")
    return meta


def lock(root: Path) -> int:
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise StoreBusyError(f"{root} is open for writing by another process (lock {root / LOCK})") from e
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
