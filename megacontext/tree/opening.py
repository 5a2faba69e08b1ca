"""Making and opening a store's files: the checks and repairs done before a :class:`~megacontext.tree.store.
MegaContextTree` exists (the store module builds the object from what these return).

Creating: the directory must be absent or empty; the LOD0-LOD2 level files (version 2, checksummed, the
vocabulary recorded in LOD0's header) are written, then ``meta.json`` last, so a directory without it is no
store. Opening: ``meta.json`` and every level file present are validated (headers, sizes, the tail chunks'
checksums, cross-file agreement and the caller's base model and compressor), rows of an interrupted commit
are dropped, a stale tail in ``meta.json`` is dropped, and each repair is listed in ``notes`` for the
recovery report. A level the history needs but that has no file is damage in a version-2 store and the
missing upgrade of a version-1 store (built by the caller when writable).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megacontext.core.lod import MAX_LEVEL
from megacontext.tree.compressor import Compressor
from megacontext.tree.format import TOKEN_DTYPE, Header, TreeFormatError
from megacontext.tree.history import gist_torch_dtype
from megacontext.tree.layout import (
    BASE_LEVELS,
    level_name,
    lock,
    needed_rows,
    open_gist_files,
    read_meta,
    reconcile,
    unlock,
)
from megacontext.tree.level_file import LevelFile

log = logging.getLogger(__name__)


def create_files(root: Path, d_model: int, fingerprint: str, compressor: Compressor, gist_dtype: str,
                 checksum_rows: int, vocab_size: int | None, durable: bool) -> tuple[list[LevelFile], int]:
    """The LOD0-LOD2 files of a new store in ``root`` (made if absent) and the writer lock's descriptor."""
    gist_torch_dtype(gist_dtype)  # validates
    if compressor.d_model != d_model:
        raise ValueError(f"compressor.d_model={compressor.d_model} but d_model={d_model}")
    if vocab_size is not None and not 0 < vocab_size <= 2**31:
        raise ValueError(f"vocab_size={vocab_size}; expected 1..{2**31}")
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; open it or choose a new directory")
    root.mkdir(parents=True, exist_ok=True)
    c = checksum_rows
    headers = [Header(0, d_model, TOKEN_DTYPE, 0, fingerprint, "", checksum_rows=c, vocab_size=vocab_size or 0)]
    headers += [Header(lv, d_model, gist_dtype, 0, fingerprint, compressor.version, checksum_rows=c)
                for lv in range(1, BASE_LEVELS)]
    lock_fd = lock(root)
    files: list[LevelFile] = []
    try:
        for lv, h in enumerate(headers):
            files.append(LevelFile.create(root / level_name(lv), h, durable))
    except BaseException:
        for f in files:
            f.close()
        unlock(lock_fd)
        raise
    return files, lock_fd


@dataclass
class Opened:
    files: list[LevelFile]  # LOD0 and every gist level present (only LOD0 when ``stale``)
    lock_fd: int | None
    meta: dict
    tail: np.ndarray  # [< 32] int32: meta.json's tail when it follows LOD0's committed blocks
    notes: list[str] = field(default_factory=list)  # what was dropped or repaired
    stale: bool = False  # gist files refused and ``rebuild`` asked: the caller recomputes every level
    missing: list[int] = field(default_factory=list)  # levels a version-1 store lacks: the caller builds them


def open_files(root: Path, compressor: Compressor | None, fingerprint: str | None, rebuild: bool, readonly: bool,
               durable: bool) -> Opened:
    """Validate and open a store's files (see the module docstring); raises TreeFormatError naming the file and
    field of the first problem, leaving nothing open or locked."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    meta = read_meta(root)
    legacy = meta.get("format_version") == 1
    if rebuild and (readonly or compressor is None):
        raise ValueError("rebuild=True needs a writable open and a compressor")
    if not readonly and compressor is None:
        raise ValueError("opening for writing needs a compressor (pass readonly=True to only read)")
    lock_fd = None if readonly else lock(root)
    files: list[LevelFile] = []
    out = Opened(files, lock_fd, meta, np.zeros(0, np.int32))
    try:
        lod0 = LevelFile.open(root / level_name(0), 0, not readonly, durable)
        files.append(lod0)
        try:
            files += open_gist_files(root, lod0, compressor, fingerprint, readonly, durable)
            out.missing = [lv for lv in range(len(files), MAX_LEVEL + 1) if needed_rows(lv, lod0.count) > 0]
            if out.missing and (readonly or not legacy):
                first = out.missing[0]
                raise TreeFormatError(root / level_name(first), "file", (
                    f"missing: the store predates levels above LOD2 and its {lod0.count} blocks need LOD{first}; "
                    "open it once for writing (not read-only) to add them") if legacy else (
                    f"missing, but LOD0 commits {lod0.count} blocks, which need {needed_rows(first, lod0.count)} "
                    f"LOD{first} gists; the store is damaged (gists can be recomputed with rebuild=True)"))
            out.notes += reconcile(files)
        except TreeFormatError as e:  # mismatch or damaged gists: fatal unless rebuilding
            if not rebuild:
                raise
            log.warning("rebuilding gists of %s: %s", root, e)
            for f in files[1:]:
                f.close()
            del files[1:]
            out.stale, out.missing = True, []
    except BaseException:
        for f in files:
            f.close()
        unlock(lock_fd)
        raise
    n0 = lod0.count
    out.notes[:0] = [f"{f.path.name}: ignored {f.discarded_bytes} bytes of uncommitted rows" for f in files
                     if f.discarded_bytes > 0]
    if meta.get("num_blocks") == n0:
        out.tail = np.asarray(meta.get("tail", []), np.int32)
    elif meta.get("tail"):
        log.warning("%s: meta.json describes %s blocks, LOD0 commits %d; dropping its tail of %d tokens",
                    root, meta.get("num_blocks"), n0, len(meta["tail"]))
        out.notes.append(f"meta.json: dropped a tail of {len(meta['tail'])} tokens that belonged to "
                         f"{meta.get('num_blocks')} blocks (LOD0 commits {n0})")
    if not all(f.checksummed for f in files):
        log.warning("%s was made before payload checksums (no checksums in %s): damage to its payload cannot be "
                    "detected", root, ", ".join(f.path.name for f in files if not f.checksummed))
    return out
