"""MegaContextTree: the whole token history on disk as LOD0 blocks and gists of every level, append-only.

Layout of a store directory: ``LOD0.ctx`` (32 int32 token ids per row), ``LOD1.ctx`` (one gist per block),
``LOD2.ctx`` (one gist per 32 LOD1 gists), ``LOD3.ctx`` ... (created as the history reaches them), a
``LODk.sum`` of chunk checksums beside each, ``meta.json`` (summary + the partial tail) and ``LOCK``. See
:mod:`megacontext.tree.format` for the level-file layout, :mod:`megacontext.tree.checksum` for the checksums
and :mod:`megacontext.tree.layout` for the directory, ``meta.json`` and the cross-file checks made on open.

Invariants
- Committed state: ``LOD1.count == LOD0.count`` and ``LOD``l``.count == LOD0.count // 32 ** (l - 1)``; every
  gist is computed once, when its block (or its 32nd child) is committed, and never again unless ``rebuild``.
- Commit order: compute every new gist and check it (non-finite gists are refused) -> stage rows in all
  touched files (creating a new level's file first) -> fsync rows and checksums -> publish from the top
  level down to LOD0 -> rewrite ``meta.json`` atomically. Nothing is written before every check passed. The
  LOD0 count is the commit point: a process killed earlier leaves gist levels with *extra* published rows at
  most, which reopening trims; a commit whose LOD0 count was published is complete. ``meta.json`` carries
  the tail only together with the block count it follows, so a stale tail is dropped, never spliced in the
  wrong place.
- Durability points: :meth:`flush` makes everything appended so far durable (blocks and tail). Appends
  also flush by themselves once ``commit_tokens`` tokens or ``commit_seconds`` seconds have accumulated since
  the last flush (checked on append), so a crash loses at most that much of what was never flushed; what
  reopening discarded is listed in ``recovery``.
- Batching: completed blocks wait in RAM and are compressed in chunks aligned to absolute multiples of
  ``batch_blocks`` (a multiple of 32) where possible; compressors treat rows independently, so the bytes on
  disk do not depend on how the tokens were chunked into ``append`` calls or when flushes happened.
- Input checks: token ids must be integers in ``[0, vocab_size)`` (the vocabulary recorded at creation);
  a refused append changes nothing.
- RAM is bounded by ``batch_blocks`` plus the caller's chunk; reads go through memory maps, and
  ``gather_gists`` reads only the rows it is asked for. Reads are checksum-verified (see
  :mod:`megacontext.tree.level_file`).
- One writer per store (``flock`` on ``LOCK``); any number of read-only openers see the state committed
  when they opened. A commit that fails half-way (e.g. disk full) leaves the store as it was at the last
  commit and the object refusing further writes; ``close`` still releases the lock.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, MAX_LEVEL, complete_entries
from megacontext.tree.compressor import Compressor, gists_of_blocks, gists_of_groups
from megacontext.tree.format import GIST_DTYPES, TOKEN_DTYPE, Header, TreeFormatError
from megacontext.tree.history import check_gist_level, check_indices, check_level, check_range, gist_torch_dtype
from megacontext.tree.layout import (
    BASE_LEVELS,
    existing_levels,
    level_name,
    lock,
    needed_rows,
    open_gist_files,
    read_meta,
    reconcile,
    unlock,
    write_meta,
)
from megacontext.tree.level_file import LevelFile, fsync_dir, sum_path

log = logging.getLogger(__name__)

_MAX_TOKEN_ID = 2**31 - 1


class CommitFailedError(RuntimeError):
    """A commit of this store failed half-way (e.g. the disk filled); the object refuses further writes."""


@dataclass
class TreeConfig(Config):
    gist_dtype: str = "float16"  # used by create(); an opened store keeps the dtype it was made with
    batch_blocks: int = 4096  # blocks per compressor call (and per commit during bulk ingest)
    durable: bool = True  # fsync before publishing: survives power loss; process kills are safe either way
    commit_tokens: int = 262_144  # appends flush (commit durably) at least every this many tokens...
    commit_seconds: float = 2.0  # ...and once this many seconds have passed since the last flush (on append)
    checksum_rows: int = 256  # used by create(): rows per checksum chunk of each level file

    def __post_init__(self):
        check(self.gist_dtype in GIST_DTYPES, f"gist_dtype={self.gist_dtype!r}; expected one of {GIST_DTYPES}")
        check(self.batch_blocks > 0 and self.batch_blocks % BLOCK == 0,
              f"batch_blocks={self.batch_blocks}; expected a positive multiple of {BLOCK}")
        check(self.commit_tokens >= 1, f"commit_tokens={self.commit_tokens} must be >= 1")
        check(self.commit_seconds >= 0, f"commit_seconds={self.commit_seconds} must be >= 0")
        check(1 <= self.checksum_rows <= 1 << 20, f"checksum_rows={self.checksum_rows}; expected 1..{1 << 20}")


def _to_rows(gists: Tensor) -> np.ndarray:
    """Gists in their storage torch dtype -> numpy rows as written to disk."""
    g = gists.contiguous()
    return (g.view(torch.int16) if g.dtype == torch.bfloat16 else g).numpy()


def as_token_array(ids, vocab_size: int | None = None) -> np.ndarray:
    """Token ids (tensor, array or list) -> int32 [n], refusing non-integers and ids outside the vocabulary."""
    if isinstance(ids, Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a {ids.dtype} tensor")
        arr = ids.detach().cpu().numpy()
    else:
        arr = np.asarray(ids)
    arr = arr.reshape(-1)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        limit = vocab_size if vocab_size else _MAX_TOKEN_ID + 1
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            where = f"the vocabulary of {vocab_size}" if vocab_size else f"[0, {_MAX_TOKEN_ID}]"
            raise ValueError(f"token id {bad} is outside {where} (ids must lie in [0, {limit}))")
    return arr.astype(np.int32)


class MegaContextTree:
    """Append-only hierarchical store; also a :class:`megacontext.tree.history.HistorySource`."""

    def __init__(self, root: Path, files: list[LevelFile], compressor: Compressor | None, config: TreeConfig,
                 tail: np.ndarray, lock_fd: int | None):
        self.root, self._files, self.compressor, self.config = root, files, compressor, config
        self._tail = tail  # [< 32] int32
        self._pending: list[np.ndarray] = []  # completed, uncommitted blocks, each [k, 32] int32
        self._pending_blocks = 0
        self._lock_fd = lock_fd
        self._failed: BaseException | None = None
        self._unflushed = 0  # tokens appended since the last flush
        self._last_flush = time.monotonic()
        self._meta_written: tuple | None = None  # (blocks, tail) the last meta.json describes
        self.recovery: list[str] = []  # what opening discarded or repaired (uncommitted rows, a stale tail, ...)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: str | Path, d_model: int, fingerprint: str, compressor: Compressor,
               gist_dtype: str | None = None, config: TreeConfig | None = None,
               vocab_size: int | None = None) -> MegaContextTree:
        """A new store. ``vocab_size`` (the base model's embedding rows) is recorded, and appends of ids outside
        it are refused."""
        config = config or TreeConfig()
        gist_dtype = gist_dtype or config.gist_dtype
        gist_torch_dtype(gist_dtype)  # validates
        if compressor.d_model != d_model:
            raise ValueError(f"compressor.d_model={compressor.d_model} but d_model={d_model}")
        if vocab_size is not None and not 0 < vocab_size <= _MAX_TOKEN_ID + 1:
            raise ValueError(f"vocab_size={vocab_size}; expected 1..{_MAX_TOKEN_ID + 1}")
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not empty; open it or choose a new directory")
        root.mkdir(parents=True, exist_ok=True)
        c = config.checksum_rows
        headers = [Header(0, d_model, TOKEN_DTYPE, 0, fingerprint, "", checksum_rows=c, vocab_size=vocab_size or 0)]
        headers += [Header(lv, d_model, gist_dtype, 0, fingerprint, compressor.version, checksum_rows=c)
                    for lv in range(1, BASE_LEVELS)]
        tree = cls(root, [], compressor, config, np.zeros(0, np.int32), lock(root))
        try:
            for lv, h in enumerate(headers):
                tree._files.append(LevelFile.create(root / level_name(lv), h, config.durable))
            tree._write_meta()  # last: a directory without meta.json is not a store
        except BaseException:
            tree.abort()
            raise
        log.info("created MegaContext store %s (d=%d, %s gists, compressor %s)", root, d_model, gist_dtype,
                 compressor.version)
        return tree

    @classmethod
    def open(cls, path: str | Path, compressor: Compressor | None = None, fingerprint: str | None = None, *,
             rebuild: bool = False, readonly: bool = False, config: TreeConfig | None = None) -> MegaContextTree:
        """Open a store. ``fingerprint``/``compressor`` = None skip those checks (reading only).

        With ``rebuild=True`` a store made for another base model or compressor (or with damaged gist files)
        gets every gist level recomputed from LOD0; a matching store is opened as is. A store made before levels
        above LOD2 existed gets the ones its history needs built when opened for writing."""
        config = config or TreeConfig()
        root = Path(path)
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
        notes: list[str] = []
        missing: list[int] = []
        try:
            lod0 = LevelFile.open(root / level_name(0), 0, not readonly, config.durable)
            files.append(lod0)
            try:
                files += open_gist_files(root, lod0, compressor, fingerprint, readonly, config.durable)
                missing = [lv for lv in range(len(files), MAX_LEVEL + 1) if needed_rows(lv, lod0.count) > 0]
                if missing and not legacy:
                    raise TreeFormatError(root / level_name(missing[0]), "file",
                                          f"missing, but LOD0 commits {lod0.count} blocks, which need "
                                          f"{needed_rows(missing[0], lod0.count)} LOD{missing[0]} gists; the "
                                          "store is damaged (gists can be recomputed with rebuild=True)")
                if missing and readonly:
                    raise TreeFormatError(root / level_name(missing[0]), "file",
                                          f"missing: the store predates levels above LOD2 and its {lod0.count} "
                                          f"blocks need LOD{missing[0]}; open it once for writing (not read-only) "
                                          "to add them")
                notes += reconcile(files)
                stale = False
            except TreeFormatError as e:  # mismatch or damaged gists: fatal unless rebuilding
                if not rebuild:
                    raise
                log.warning("rebuilding gists of %s: %s", root, e)
                for f in files[1:]:
                    f.close()
                del files[1:]
                stale, missing = True, []
        except BaseException:
            for f in files:
                f.close()
            unlock(lock_fd)
            raise
        n0 = lod0.count
        notes = [f"{f.path.name}: ignored {f.discarded_bytes} bytes of uncommitted rows" for f in files
                 if f.discarded_bytes > 0] + notes
        tail = np.asarray(meta.get("tail", []), np.int32) if meta.get("num_blocks") == n0 else np.zeros(0, np.int32)
        if meta.get("num_blocks") != n0 and meta.get("tail"):
            log.warning("%s: meta.json describes %s blocks, LOD0 commits %d; dropping its tail of %d tokens",
                        root, meta.get("num_blocks"), n0, len(meta.get("tail", [])))
            notes.append(f"meta.json: dropped a tail of {len(meta['tail'])} tokens that belonged to "
                         f"{meta.get('num_blocks')} blocks (LOD0 commits {n0})")
        tree = cls(root, files, compressor, config, tail, lock_fd)
        tree.recovery = notes
        tree._meta_written = (n0, tuple(tail.tolist())) if meta.get("num_blocks") == n0 else None
        if not all(f.checksummed for f in files):
            log.warning("%s was made before payload checksums (no checksums in %s): damage to its payload cannot "
                        "be detected", root, ", ".join(f.path.name for f in files if not f.checksummed))
        try:
            if stale:
                tree._rebuild_files(fingerprint or lod0.header.fingerprint,
                                    meta.get("gist_dtype", config.gist_dtype))
            elif missing:
                tree._build_levels(missing[0])
                tree.recovery.append(f"added LOD{missing[0]}..LOD{missing[-1]} to a store made before levels "
                                     "above LOD2")
        except BaseException:
            tree.abort()
            raise
        return tree

    def rebuild(self, compressor: Compressor | None = None, fingerprint: str | None = None) -> None:
        """Recompute every gist level from LOD0 (new compressor and/or base model)."""
        self._require_writable()
        self.compressor = compressor or self.compressor
        self._drain()
        fingerprint, gist_dtype = fingerprint or self.fingerprint, self.gist_dtype_name
        for f in self._files[1:]:
            f.close()
        del self._files[1:]
        self._rebuild_files(fingerprint, gist_dtype)

    def _checksum_rows(self) -> int:
        return self._files[0].header.checksum_rows or self.config.checksum_rows

    def _build(self, first_level: int, fingerprint: str, gist_dtype: str) -> list[Path]:
        """Compute gist levels ``first_level``.. the history needs into ``LODk.build.ctx`` files (level by level,
        reading the level below); returns their paths. Levels below ``first_level`` must be open in ``_files``."""
        c, bsz, n0 = self.compressor, self.config.batch_blocks, self._files[0].count
        dt = gist_torch_dtype(gist_dtype)
        below = self._files[first_level - 1] if first_level > 1 else self._files[0]
        built, paths = [], []
        try:
            for lv in range(first_level, MAX_LEVEL + 1):
                need = needed_rows(lv, n0)
                if lv >= BASE_LEVELS and need == 0:
                    break
                path = self.root / f"LOD{lv}.build.ctx"
                h = Header(lv, c.d_model, gist_dtype, 0, fingerprint, c.version, checksum_rows=self._checksum_rows())
                f = LevelFile.create(path, h, self.config.durable)
                built.append(f)
                paths.append(path)
                src = need if lv == 1 else need * BLOCK  # rows of the level below that feed this one
                for i in tqdm(range(0, src, bsz), desc=f"build LOD{lv}", unit="batch", disable=src <= bsz):
                    rows = below.read_tensor(i, min(i + bsz, src))  # i is a multiple of bsz, itself of 32
                    g = (gists_of_blocks(c, rows) if lv == 1 else gists_of_groups(c, rows, lv)).to(dt)  # [n, d]
                    self._check_finite(g, lv)
                    f.append_rows(_to_rows(g))
                f.sync()
                f.publish()
                below = f
            return paths
        finally:
            for f in built:
                f.close()

    def _install(self, paths: list[Path]) -> None:
        """Rename built level files (and their checksum files) into place and open them."""
        for p in paths:
            lv = int(p.name.split(".")[0][3:])
            os.replace(sum_path(p), self.root / f"LOD{lv}.sum")
            os.replace(p, self.root / level_name(lv))
        if self.config.durable:
            fsync_dir(self.root)
        for p in paths:
            lv = int(p.name.split(".")[0][3:])
            self._files.append(LevelFile.open(self.root / level_name(lv), lv, True, self.config.durable))

    def _rebuild_files(self, fingerprint: str, gist_dtype: str) -> None:
        c, lod0 = self.compressor, self._files[0]
        paths = self._build(1, fingerprint, gist_dtype)
        for lv in range(len(paths) + 1, existing_levels(self.root)):  # levels the old files had beyond the new
            (self.root / level_name(lv)).unlink()
            (self.root / f"LOD{lv}.sum").unlink(missing_ok=True)
        if (lod0.header.fingerprint, lod0.header.dim) != (fingerprint, c.d_model):
            lod0.write_header(Header(0, c.d_model, TOKEN_DTYPE, lod0.count, fingerprint, "",
                                     format_version=lod0.header.format_version,
                                     checksum_rows=lod0.header.checksum_rows, vocab_size=lod0.header.vocab_size,
                                     tail_digest=lod0.header.tail_digest))
        self._install(paths)
        self._write_meta()
        log.info("rebuilt the gists of %s (%s) with %s", self.root,
                 ", ".join(f"LOD{lv}: {f.count}" for lv, f in enumerate(self._files) if lv), c.version)

    def _build_levels(self, first_level: int) -> None:
        """Add the upper levels a store made before they existed needs (its lower levels are kept)."""
        f1 = self._files[1].header
        self._install(self._build(first_level, f1.fingerprint, f1.dtype))
        self._write_meta()
        log.info("%s: added LOD%d..LOD%d (a store made before levels above LOD2)", self.root, first_level,
                 len(self._files) - 1)

    # ------------------------------------------------------------------ writing
    @property
    def writable(self) -> bool:
        return bool(self._files) and self._files[0].writable

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"store {self.root} is open read-only")
        if self._failed is not None:
            raise CommitFailedError(f"store {self.root}: an earlier commit failed ({self._failed}); close and reopen "
                                    "it (everything committed before that commit is intact)")

    @property
    def vocab_size(self) -> int | None:
        return self._files[0].header.vocab_size or None

    def append(self, token_ids) -> None:
        """Append token ids (any int tensor/array/list in ``[0, vocab_size)``; anything else is refused with
        nothing changed). Completed blocks are committed in batches, and everything appended is flushed once
        ``commit_tokens`` tokens or ``commit_seconds`` seconds have accumulated since the last flush."""
        self._require_writable()
        arr = as_token_array(token_ids, self.vocab_size)
        if arr.size == 0:
            return
        buf = np.concatenate([self._tail, arr]) if self._tail.size else arr
        n_full = buf.size // BLOCK
        if n_full:
            self._pending.append(buf[: n_full * BLOCK].reshape(n_full, BLOCK))
            self._pending_blocks += n_full
        self._tail = buf[n_full * BLOCK:].copy()
        self._unflushed += arr.size
        self._commit_aligned()
        cfg = self.config
        if self._unflushed >= cfg.commit_tokens or time.monotonic() - self._last_flush >= cfg.commit_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit every completed block and persist the tail: everything appended so far is durable on return."""
        self._require_writable()
        self._drain()
        state = (self._files[0].count, tuple(self._tail.tolist()))
        if state != self._meta_written:
            self._write_meta()
        self._unflushed, self._last_flush = 0, time.monotonic()

    @property
    def unflushed_tokens(self) -> int:
        """Tokens appended since the last flush (lost by a crash now, at most ``commit_tokens``)."""
        return self._unflushed

    def _commit_aligned(self) -> None:
        bsz = self.config.batch_blocks
        while self._pending_blocks >= (need := bsz - self._files[0].count % bsz):
            self._commit(need)

    def _drain(self) -> None:
        self._commit_aligned()
        if self._pending_blocks:
            self._commit(self._pending_blocks)

    def _peek_pending(self, n: int) -> np.ndarray:
        if len(self._pending) > 1:
            self._pending = [np.concatenate(self._pending)]
        return self._pending[0][:n]

    def _drop_pending(self, n: int) -> None:
        rest = self._pending[0][n:]
        self._pending = [rest] if len(rest) else []
        self._pending_blocks -= n

    @staticmethod
    def _check_finite(g: Tensor, level: int, first: int = 0) -> None:
        bad = ~torch.isfinite(g.float()).all(dim=-1)  # [n]
        if bool(bad.any()):
            rows = (bad.nonzero().flatten() + first).tolist()
            raise ValueError(f"the compressor made non-finite LOD{level} gists (rows {rows[:5]}"
                             f"{' ...' if len(rows) > 5 else ''}); nothing was committed")

    def _commit(self, n: int) -> None:
        """Compress the first n pending blocks and commit them (see the module docstring for the order)."""
        files = self._files
        dt = gist_torch_dtype(self.gist_dtype_name)
        ids = self._peek_pending(n)  # [n, 32] int32
        new = {1: gists_of_blocks(self.compressor, torch.from_numpy(ids).long()).to(dt)}  # level -> [k, d]
        self._check_finite(new[1], 1, files[1].count)
        for lv in range(2, MAX_LEVEL + 1):  # parents completed by the new rows of the level below
            below = files[lv - 1] if lv - 1 < len(files) else None
            before = below.count if below is not None else 0
            after = before + new[lv - 1].shape[0]
            if after // BLOCK == before // BLOCK:
                break
            first = before // BLOCK * BLOCK  # start of the group the new rows continue
            old = below.read_tensor(first, before) if before > first else new[lv - 1][:0]
            pool = torch.cat([old, new[lv - 1]])[: after // BLOCK * BLOCK - first]  # [32m, d]
            new[lv] = gists_of_groups(self.compressor, pool, lv).to(dt)  # [m, d]
            self._check_finite(new[lv], lv, before // BLOCK)
        try:  # every check passed: from here on a failure leaves the store at its last commit
            created = False
            for lv in new:
                if lv >= len(files):
                    h1 = files[1].header
                    files.append(LevelFile.create(self.root / level_name(lv), Header(
                        lv, h1.dim, h1.dtype, 0, h1.fingerprint, h1.compressor_version,
                        checksum_rows=self._checksum_rows()), self.config.durable))
                    created = True
            if created and self.config.durable:
                fsync_dir(self.root)
            files[0].append_rows(ids)
            for lv, g in new.items():
                files[lv].append_rows(_to_rows(g))
            touched = [files[0]] + [files[lv] for lv in new]
            for f in touched:
                f.sync()
            for f in reversed(touched):  # top level first, LOD0 last: its count is the commit point
                f.publish()
            self._drop_pending(n)
            self._write_meta()
        except BaseException as e:
            self._failed = e
            raise

    def _write_meta(self) -> None:
        lod0, lod1 = self._files[0], self._files[1]
        tail = self._tail.tolist() if not self._pending_blocks else []
        write_meta(self.root, {
            "d_model": self.d_model, "gist_dtype": lod1.header.dtype, "fingerprint": lod0.header.fingerprint,
            "compressor_version": lod1.header.compressor_version, "num_blocks": lod0.count,
            "vocab_size": lod0.header.vocab_size, "checksum_rows": lod0.header.checksum_rows,
            "levels": len(self._files),
            # the tail only follows the committed blocks when nothing is pending between them
            "tail": tail,
        }, self.config.durable)
        self._meta_written = (lod0.count, tuple(tail)) if not self._pending_blocks else None

    def close(self) -> None:
        """Flush (when writable and healthy) and close; the lock is released even when the flush fails."""
        if not self._files:
            return
        try:
            if self.writable and self._failed is None:
                self.flush()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without committing: pending blocks and an unflushed tail are dropped, as in a crash."""
        for f in self._files:
            f.close()
        self._files, self._pending, self._pending_blocks = [], [], 0
        unlock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> MegaContextTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ read API (HistorySource)
    @property
    def fingerprint(self) -> str:
        return self._files[0].header.fingerprint

    @property
    def d_model(self) -> int:
        return self._files[0].header.dim

    @property
    def compressor_version(self) -> str:
        return self._files[1].header.compressor_version

    @property
    def gist_dtype_name(self) -> str:
        return self._files[1].header.dtype

    @property
    def num_levels(self) -> int:
        """Level files open (LOD0..LOD2 always, plus the levels the committed history has reached)."""
        return len(self._files)

    @property
    def num_tokens(self) -> int:
        return (self._files[0].count + self._pending_blocks) * BLOCK + self._tail.size

    @property
    def num_committed_blocks(self) -> int:
        return self._files[0].count

    def num_entries(self, level: int) -> int:
        check_level(level)
        return complete_entries(self.num_tokens, level)

    def tokens(self, start: int, end: int) -> Tensor:
        """Token ids of [start, end): committed rows via the memory map, pending blocks and tail from RAM."""
        check_range("token", start, end, self.num_tokens)
        committed = self._files[0].count * BLOCK
        parts = []
        if start < committed:
            stop = min(end, committed)
            first = start // BLOCK
            rows = self._files[0].read(first, -(-stop // BLOCK))  # [k, 32]
            parts.append(rows.reshape(-1)[start - first * BLOCK: stop - first * BLOCK])
        if end > committed:
            ram = np.concatenate([p.reshape(-1) for p in self._pending] + [self._tail])
            parts.append(ram[max(start, committed) - committed: end - committed])
        out = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return torch.from_numpy(out).long()

    def blocks(self, start_index: int, end_index: int) -> Tensor:
        """Complete LOD0 blocks [start_index, end_index) -> int64 [n, 32]."""
        check_range("LOD0 block", start_index, end_index, self.num_entries(0))
        return self.tokens(start_index * BLOCK, end_index * BLOCK).view(-1, BLOCK)

    def _level(self, level: int, end_index: int) -> LevelFile:
        """The file of gist level ``level``, after committing pending blocks if their gists are asked for."""
        if level >= len(self._files) or end_index > self._files[level].count:
            self._drain()  # the gists of pending blocks are made on demand
        return self._files[level]

    def gists(self, level: int, start_index: int, end_index: int) -> Tensor:
        """Gists [start_index, end_index) of a level >= 1 -> [n, d] in the store's gist dtype."""
        check_gist_level(level)
        check_range(f"LOD{level} gist", start_index, end_index, self.num_entries(level))
        if start_index == end_index and level >= len(self._files):
            return self._files[1].read_tensor(0, 0)
        return self._level(level, end_index).read_tensor(start_index, end_index)

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        """Gists of a level >= 1 at ``indices`` [n] (any order, repeats allowed) -> [n, d] in the store's gist
        dtype, read by fancy indexing on the memory map: the cost follows n, not the index spread."""
        check_gist_level(level)
        idx = check_indices(f"LOD{level} gist", indices, self.num_entries(level))  # int64 [n] on CPU
        if not idx.numel():
            return self._files[1].gather_tensor(idx.numpy())
        return self._level(level, int(idx.max()) + 1).gather_tensor(idx.numpy())

    def tail_tokens(self) -> Tensor:
        return torch.from_numpy(self._tail.copy()).long()
