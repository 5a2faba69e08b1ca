"""Store directory layout: file names, ``meta.json``, the writer lock, and the cross-file checks of ``open``.

A store directory holds ``LOD0.ctx``, ``LOD1.ctx``, ``LOD2.ctx`` (see :mod:`megacontext.tree.format`),
``meta.json`` and ``LOCK``. ``meta.json`` is a summary plus the partial tail; it is replaced atomically
(write temp, fsync, rename) and carries a CRC-32 so a damaged tail is refused rather than read as tokens.
Level-file headers are authoritative for counts, widths, fingerprint and compressor version; the checks
here make the three files agree with each other and with the caller's base model and compressor.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import zlib
from pathlib import Path

from megacontext.core.lod import BLOCK
from megacontext.tree.compressor import Compressor
from megacontext.tree.format import TreeFormatError
from megacontext.tree.level_file import LevelFile, fsync_dir

log = logging.getLogger(__name__)

LEVEL_FILES = ("LOD0.ctx", "LOD1.ctx", "LOD2.ctx")
META = "meta.json"
LOCK = "LOCK"
META_VERSION = 1


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


def open_gist_files(root: Path, lod0: LevelFile, compressor: Compressor | None, fingerprint: str | None,
                     readonly: bool, durable: bool) -> list[LevelFile]:
    if fingerprint is not None and lod0.header.fingerprint != fingerprint:
        raise StoreMismatchError(lod0.path, "fingerprint",
                                 f"store made for base model {lod0.header.fingerprint!r}, the loaded base model is "
                                 f"{fingerprint!r}; open with rebuild=True to recompute its gists")
    if compressor is not None and compressor.d_model != lod0.header.dim:
        raise StoreMismatchError(lod0.path, "dim", f"store d_model={lod0.header.dim}, compressor d_model="
                                 f"{compressor.d_model}; open with rebuild=True to recompute its gists")
    out: list[LevelFile] = []
    try:
        for lv in (1, 2):
            f = LevelFile.open(root / LEVEL_FILES[lv], lv, not readonly, durable)
            out.append(f)
            h, h0 = f.header, lod0.header
            if h.dim != h0.dim:
                raise TreeFormatError(f.path, "dim", f"{h.dim}; LOD0 of this store says {h0.dim}")
            if h.fingerprint != h0.fingerprint:
                raise TreeFormatError(f.path, "fingerprint", f"{h.fingerprint!r}; LOD0 says {h0.fingerprint!r}")
            if lv == 2 and (h.dtype, h.compressor_version) != (out[0].header.dtype, out[0].header.compressor_version):
                raise TreeFormatError(f.path, "compressor_version", f"{h.compressor_version!r} ({h.dtype}) differs "
                                      f"from LOD1's {out[0].header.compressor_version!r} ({out[0].header.dtype}); "
                                      "an interrupted rebuild: open with rebuild=True")
            if compressor is not None and h.compressor_version != compressor.version:
                raise StoreMismatchError(f.path, "compressor_version",
                                         f"gists made by {h.compressor_version!r}, compressor is "
                                         f"{compressor.version!r}; open with rebuild=True to recompute them")
    except BaseException:
        for f in out:
            f.close()
        raise
    return out


def reconcile(files: list[LevelFile]) -> None:
    """Trim gist rows published by a commit whose LOD0 count never was; refuse gists that are missing."""
    n0 = files[0].count
    for f, need in ((files[1], n0), (files[2], n0 // BLOCK)):
        if f.count < need:
            raise TreeFormatError(f.path, "entry_count", f"{f.count} gists but LOD0 commits {n0} blocks, "
                                  f"which need {need}; open with rebuild=True")
        if f.count > need:
            log.info("%s: dropping %d gists of an interrupted commit", f.path, f.count - need)
            f.trim(need)


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
    if version != META_VERSION:
        raise TreeFormatError(path, "format_version", f"{version!r}; expected {META_VERSION}")
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
