"""MegaContextTree: the whole token history on disk as LOD0 blocks and gists of every level, append-only.

Layout of a store directory: ``LOD0.ctx`` (32 int32 token ids per row), ``LOD1.ctx`` (one gist per block),
``LOD2.ctx`` (one gist per 32 LOD1 gists), ``LOD3.ctx`` ... (created as the history reaches them), a
``LODk.sum`` of chunk checksums beside each, ``meta.json`` (summary + the partial tail), ``LOCK`` and ``lex/``
(the lexical index, :mod:`megacontext.tree.lexical_store`: derived from LOD0, persisted by :meth:`flush` after
LOD0, rebuilt if lost). See :mod:`megacontext.tree.format` for the level-file layout,
:mod:`megacontext.tree.checksum` for the checksums and :mod:`megacontext.tree.layout` for the directory.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, complete_entries
from megacontext.tree.commit import plan_commit, write_commit
from megacontext.tree.compressor import Compressor
from megacontext.tree.format import GIST_DTYPES, TOKEN_DTYPE, Header
from megacontext.tree.history import (
    as_token_array,
    check_gist_level,
    check_indices,
    check_level,
    check_range,
    gist_torch_dtype,
)
from megacontext.tree.layout import existing_levels, level_name, unlock, write_meta
from megacontext.tree.level_file import LevelFile, sum_path
from megacontext.tree.lexical_store import StoredLexicalIndex, open_lexical
from megacontext.tree.opening import create_files, open_files
from megacontext.tree.rebuild import build_levels, install

log = logging.getLogger(__name__)

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
    lexical: bool = True  # keep the lexical index (lex/, see megacontext.tree.lexical_store) beside the levels

    def __post_init__(self):
        check(self.gist_dtype in GIST_DTYPES, f"gist_dtype={self.gist_dtype!r}; expected one of {GIST_DTYPES}")
        check(self.batch_blocks > 0 and self.batch_blocks % BLOCK == 0,
              f"batch_blocks={self.batch_blocks}; expected a positive multiple of {BLOCK}")
        check(self.commit_tokens >= 1, f"commit_tokens={self.commit_tokens} must be >= 1")
        check(self.commit_seconds >= 0, f"commit_seconds={self.commit_seconds} must be >= 0")
        check(1 <= self.checksum_rows <= 1 << 20, f"checksum_rows={self.checksum_rows}; expected 1..{1 << 20}")


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
        self.lexical: StoredLexicalIndex | None = None  # BM25 index of the blocks (config.lexical)

    @classmethod
    def create(cls, path: str | Path, d_model: int, fingerprint: str, compressor: Compressor,
               gist_dtype: str | None = None, config: TreeConfig | None = None,
               vocab_size: int | None = None) -> MegaContextTree:
        """A new store. ``vocab_size`` (the base model's embedding rows) is recorded, and appends of ids outside
        it are refused."""
        config = config or TreeConfig()
        root = Path(path)
        gist_dtype = gist_dtype or config.gist_dtype
        files, lock_fd = create_files(root, d_model, fingerprint, compressor, gist_dtype, config.checksum_rows,
                                      vocab_size, config.durable)
        tree = cls(root, files, compressor, config, np.zeros(0, np.int32), lock_fd)
        try:
            tree._write_meta()  # last: a directory without meta.json is not a store
            tree.lexical = open_lexical(tree) if config.lexical else None
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
        above LOD2 existed gets the ones its history needs built when opened for writing. ``recovery`` lists
        what opening dropped or repaired."""
        config = config or TreeConfig()
        root = Path(path)
        o = open_files(root, compressor, fingerprint, rebuild, readonly, config.durable)
        tree = cls(root, o.files, compressor, config, o.tail, o.lock_fd)
        tree.recovery = o.notes
        n0 = o.files[0].count
        tree._meta_written = (n0, tuple(o.tail.tolist())) if o.meta.get("num_blocks") == n0 else None
        try:
            if o.stale:
                tree._rebuild_files(fingerprint or o.files[0].header.fingerprint,
                                    o.meta.get("gist_dtype", config.gist_dtype))
            elif o.missing:
                h1 = tree._files[1].header
                tree._build(o.missing[0], h1.fingerprint, h1.dtype)
                tree._write_meta()
                tree.recovery.append(f"added LOD{o.missing[0]}..LOD{len(tree._files) - 1} to a store made before "
                                     "levels above LOD2")
                log.info("%s: %s", root, tree.recovery[-1])
            tree.lexical = open_lexical(tree) if config.lexical else None
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

    def _checksum_rows(self) -> int:  # chunk size recorded at creation (older stores: the config's)
        return self._files[0].header.checksum_rows or self.config.checksum_rows
    def _build(self, first_level: int, fingerprint: str, gist_dtype: str) -> None:
        """Build gist levels ``first_level``.. from the open level below them and install them (see
        :mod:`megacontext.tree.rebuild`)."""
        cfg = self.config
        paths = build_levels(self.root, self._files[first_level - 1], first_level, self._files[0].count,
                             self.compressor, fingerprint, gist_dtype, self._checksum_rows(), cfg.batch_blocks,
                             cfg.durable)
        if first_level == 1:  # a rebuild: levels the old files had beyond the new ones go
            for lv in range(len(paths) + 1, existing_levels(self.root)):
                (self.root / level_name(lv)).unlink()
                sum_path(self.root / level_name(lv)).unlink(missing_ok=True)
        self._files += install(self.root, paths, cfg.durable)

    def _rebuild_files(self, fingerprint: str, gist_dtype: str) -> None:
        c, lod0 = self.compressor, self._files[0]
        h0 = lod0.header
        if (h0.fingerprint, h0.dim) != (fingerprint, c.d_model):
            lod0.write_header(Header(0, c.d_model, TOKEN_DTYPE, lod0.count, fingerprint, "",
                                     format_version=h0.format_version, checksum_rows=h0.checksum_rows,
                                     vocab_size=h0.vocab_size, tail_digest=h0.tail_digest))
        self._build(1, fingerprint, gist_dtype)
        self._write_meta()
        log.info("rebuilt the gists of %s (%s) with %s", self.root,
                 ", ".join(f"LOD{lv}: {f.count}" for lv, f in enumerate(self._files) if lv), c.version)

    @property
    def writable(self) -> bool:
        return bool(self._files) and self._files[0].writable

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"store {self.root} is open read-only")
        if self._failed is not None:
            raise CommitFailedError(f"store {self.root}: an earlier commit failed ({self._failed}); close and reopen "
                                    "it (everything committed before that commit is intact)")

    vocab_size = property(lambda self: self._files[0].header.vocab_size or None, doc="ids must lie below this")

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
        if self.lexical is not None:  # after LOD0 and meta.json are durable: the index never runs ahead
            self.lexical.sync(self, persist=True)
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

    def _commit(self, n: int) -> None:
        """Compress the first n pending blocks and commit them (see the module docstring for the order)."""
        ids = self._peek_pending(n)  # [n, 32] int32
        new = plan_commit(self._files, self.compressor, ids, gist_torch_dtype(self.gist_dtype_name))
        try:  # every check passed: from here on a failure leaves the store at its last commit
            write_commit(self.root, self._files, ids, new, self._checksum_rows(), self.config.durable)
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
