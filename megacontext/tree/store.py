"""MegaContextTree: the whole token history on disk as LOD0 blocks, LOD1 and LOD2 gists, append-only.

Layout of a store directory: ``LOD0.ctx`` (32 int32 token ids per row), ``LOD1.ctx`` (one gist per block),
``LOD2.ctx`` (one gist per 32 LOD1 gists), ``meta.json`` (summary + the partial tail) and ``LOCK``.
See :mod:`megacontext.tree.format` for the level-file layout and :mod:`megacontext.tree.layout` for the
directory, ``meta.json`` and the cross-file checks made on open.

Invariants
- Committed state: ``LOD1.count == LOD0.count`` and ``LOD2.count == LOD0.count // 32``; every gist is
  computed once, when its block (or its 32nd child) is committed, and never again unless ``rebuild``.
- Commit order: stage rows in all three files -> fsync -> publish LOD2, LOD1, then LOD0 -> rewrite
  ``meta.json`` atomically. The LOD0 count is the commit point: a process killed earlier leaves gist
  levels with *extra* published rows at most, which reopening trims; a commit whose LOD0 count was
  published is complete. ``meta.json`` carries the tail only together with the block count it follows,
  so a stale tail is dropped, never spliced in the wrong place.
- Batching: completed blocks wait in RAM and are compressed in chunks aligned to absolute multiples of
  ``batch_blocks`` (which is a multiple of 32), so the bytes on disk do not depend on how the tokens were
  chunked into ``append`` calls. Reading gists of blocks still waiting forces them out early.
- RAM is bounded by ``batch_blocks`` plus the caller's chunk; reads go through memory maps, and
  ``gather_gists`` reads only the rows it is asked for.
- One writer per store (``flock`` on ``LOCK``); any number of read-only openers see the state committed
  when they opened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, complete_entries
from megacontext.tree.compressor import Compressor, gists_of_blocks, gists_of_groups
from megacontext.tree.format import GIST_DTYPES, TOKEN_DTYPE, Header, TreeFormatError
from megacontext.tree.history import check_gist_level, check_indices, check_level, check_range, gist_torch_dtype
from megacontext.tree.layout import (
    LEVEL_FILES,
    lock,
    open_gist_files,
    read_meta,
    reconcile,
    unlock,
    write_meta,
)
from megacontext.tree.level_file import LevelFile, fsync_dir

log = logging.getLogger(__name__)

_MAX_TOKEN_ID = 2**31 - 1


@dataclass
class TreeConfig(Config):
    gist_dtype: str = "float16"  # used by create(); an opened store keeps the dtype it was made with
    batch_blocks: int = 4096  # blocks per compressor call (and per commit during bulk ingest)
    durable: bool = True  # fsync before publishing: survives power loss; process kills are safe either way

    def __post_init__(self):
        check(self.gist_dtype in GIST_DTYPES, f"gist_dtype={self.gist_dtype!r}; expected one of {GIST_DTYPES}")
        check(self.batch_blocks > 0 and self.batch_blocks % BLOCK == 0,
              f"batch_blocks={self.batch_blocks}; expected a positive multiple of {BLOCK}")


def _to_rows(gists: Tensor) -> np.ndarray:
    """Gists in their storage torch dtype -> numpy rows as written to disk."""
    g = gists.contiguous()
    return (g.view(torch.int16) if g.dtype == torch.bfloat16 else g).numpy()


def _as_token_array(ids) -> np.ndarray:
    arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > _MAX_TOKEN_ID):
        raise ValueError(f"token ids must lie in [0, {_MAX_TOKEN_ID}], got range [{arr.min()}, {arr.max()}]")
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

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: str | Path, d_model: int, fingerprint: str, compressor: Compressor,
               gist_dtype: str | None = None, config: TreeConfig | None = None) -> MegaContextTree:
        config = config or TreeConfig()
        gist_dtype = gist_dtype or config.gist_dtype
        gist_torch_dtype(gist_dtype)  # validates
        if compressor.d_model != d_model:
            raise ValueError(f"compressor.d_model={compressor.d_model} but d_model={d_model}")
        root = Path(path)
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not empty; open it or choose a new directory")
        root.mkdir(parents=True, exist_ok=True)
        headers = [Header(0, d_model, TOKEN_DTYPE, 0, fingerprint, "")]
        headers += [Header(lv, d_model, gist_dtype, 0, fingerprint, compressor.version) for lv in (1, 2)]
        tree = cls(root, [], compressor, config, np.zeros(0, np.int32), lock(root))
        try:
            for name, h in zip(LEVEL_FILES, headers, strict=True):
                tree._files.append(LevelFile.create(root / name, h, config.durable))
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
        gets LOD1/LOD2 recomputed from LOD0; a matching store is opened as is."""
        config = config or TreeConfig()
        root = Path(path)
        meta = read_meta(root)
        if rebuild and (readonly or compressor is None):
            raise ValueError("rebuild=True needs a writable open and a compressor")
        if not readonly and compressor is None:
            raise ValueError("opening for writing needs a compressor (pass readonly=True to only read)")
        lock_fd = None if readonly else lock(root)
        files: list[LevelFile] = []
        try:
            lod0 = LevelFile.open(root / LEVEL_FILES[0], 0, not readonly, config.durable)
            files.append(lod0)
            try:
                files += open_gist_files(root, lod0, compressor, fingerprint, readonly, config.durable)
                reconcile(files)
                stale = False
            except TreeFormatError as e:  # mismatch or damaged gists: fatal unless rebuilding
                if not rebuild:
                    raise
                log.warning("rebuilding gists of %s: %s", root, e)
                for f in files[1:]:
                    f.close()
                del files[1:]
                stale = True
        except BaseException:
            for f in files:
                f.close()
            unlock(lock_fd)
            raise
        n0 = lod0.count
        tail = np.asarray(meta.get("tail", []), np.int32) if meta.get("num_blocks") == n0 else np.zeros(0, np.int32)
        if meta.get("num_blocks") != n0 and meta.get("tail"):
            log.warning("%s: meta.json describes %s blocks, LOD0 commits %d; dropping its tail of %d tokens",
                        root, meta.get("num_blocks"), n0, len(meta.get("tail", [])))
        tree = cls(root, files, compressor, config, tail, lock_fd)
        if stale:
            tree._rebuild_files(fingerprint or lod0.header.fingerprint, meta.get("gist_dtype", config.gist_dtype))
        return tree

    def rebuild(self, compressor: Compressor | None = None, fingerprint: str | None = None) -> None:
        """Recompute every LOD1/LOD2 gist from LOD0 (new compressor and/or base model)."""
        self._require_writable()
        self.compressor = compressor or self.compressor
        self._drain()
        fingerprint, gist_dtype = fingerprint or self.fingerprint, self.gist_dtype_name
        for f in self._files[1:]:
            f.close()
        del self._files[1:]
        self._rebuild_files(fingerprint, gist_dtype)

    def _rebuild_files(self, fingerprint: str, gist_dtype: str) -> None:
        c, lod0, bsz = self.compressor, self._files[0], self.config.batch_blocks
        dt = gist_torch_dtype(gist_dtype)
        tmp = []
        for lv in (1, 2):
            h = Header(lv, c.d_model, gist_dtype, 0, fingerprint, c.version)
            tmp.append(LevelFile.create(self.root / (LEVEL_FILES[lv] + ".rebuild"), h, self.config.durable))
        for i in tqdm(range(0, lod0.count, bsz), desc="rebuild gists", unit="batch", disable=lod0.count <= bsz):
            g1 = gists_of_blocks(c, lod0.read_tensor(i, min(i + bsz, lod0.count))).to(dt)  # [n, d]
            # i is a multiple of bsz (itself a multiple of 32), so a batch holds whole LOD2 groups
            g2 = gists_of_groups(c, g1[: g1.shape[0] // BLOCK * BLOCK]).to(dt)  # [n // 32, d]
            tmp[0].append_rows(_to_rows(g1))
            tmp[1].append_rows(_to_rows(g2))
        for f in tmp:
            f.sync()
            f.publish()
            f.close()
        for lv in (1, 2):
            os.replace(self.root / (LEVEL_FILES[lv] + ".rebuild"), self.root / LEVEL_FILES[lv])
        if self.config.durable:
            fsync_dir(self.root)
        if (lod0.header.fingerprint, lod0.header.dim) != (fingerprint, c.d_model):
            lod0.write_header(Header(0, c.d_model, TOKEN_DTYPE, lod0.count, fingerprint, ""))
        for lv in (1, 2):
            self._files.append(LevelFile.open(self.root / LEVEL_FILES[lv], lv, True, self.config.durable))
        self._write_meta()
        log.info("rebuilt %d LOD1 and %d LOD2 gists of %s with %s", self._files[1].count, self._files[2].count,
                 self.root, c.version)

    # ------------------------------------------------------------------ writing
    @property
    def writable(self) -> bool:
        return self._files[0].writable

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"store {self.root} is open read-only")

    def append(self, token_ids) -> None:
        """Append token ids (any int tensor/array/list). Completed blocks are committed in batches."""
        self._require_writable()
        arr = _as_token_array(token_ids)
        if arr.size == 0:
            return
        buf = np.concatenate([self._tail, arr]) if self._tail.size else arr
        n_full = buf.size // BLOCK
        if n_full:
            self._pending.append(buf[: n_full * BLOCK].reshape(n_full, BLOCK))
            self._pending_blocks += n_full
        self._tail = buf[n_full * BLOCK:].copy()
        self._commit_aligned()

    def flush(self) -> None:
        """Commit every completed block and persist the tail."""
        self._require_writable()
        self._drain()
        self._write_meta()

    def _commit_aligned(self) -> None:
        bsz = self.config.batch_blocks
        while self._pending_blocks >= (need := bsz - self._files[0].count % bsz):
            self._commit(need)

    def _drain(self) -> None:
        self._commit_aligned()
        if self._pending_blocks:
            self._commit(self._pending_blocks)

    def _take_pending(self, n: int) -> np.ndarray:
        allp = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        rest = allp[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_blocks -= n
        return allp[:n]

    def _commit(self, n: int) -> None:
        """Compress the first n pending blocks and commit them (see the module docstring for the order)."""
        lod0, lod1, lod2 = self._files
        dt = gist_torch_dtype(self.gist_dtype_name)
        ids = self._take_pending(n)  # [n, 32] int32
        g1 = gists_of_blocks(self.compressor, torch.from_numpy(ids).long()).to(dt)  # [n, d]
        before, after = lod1.count, lod1.count + n
        first = before // BLOCK * BLOCK  # start of the LOD2 group the new gists continue
        g2 = None
        if after // BLOCK > before // BLOCK:
            pool = torch.cat([lod1.read_tensor(first, before), g1])[: after // BLOCK * BLOCK - first]  # [32m, d]
            g2 = gists_of_groups(self.compressor, pool).to(dt)  # [m, d]
        lod0.append_rows(ids)
        lod1.append_rows(_to_rows(g1))
        if g2 is not None:
            lod2.append_rows(_to_rows(g2))
        for f in (lod0, lod1, lod2):
            f.sync()
        for f in (lod2, lod1, lod0):  # LOD0 last: its count is the commit point
            f.publish()
        self._write_meta()

    def _write_meta(self) -> None:
        lod0, lod1 = self._files[0], self._files[1]
        write_meta(self.root, {
            "d_model": self.d_model, "gist_dtype": lod1.header.dtype, "fingerprint": lod0.header.fingerprint,
            "compressor_version": lod1.header.compressor_version, "num_blocks": lod0.count,
            # the tail only follows the committed blocks when nothing is pending between them
            "tail": self._tail.tolist() if not self._pending_blocks else [],
        }, self.config.durable)

    def close(self) -> None:
        if not self._files:
            return
        if self.writable:
            self.flush()
        for f in self._files:
            f.close()
        self._files = []
        unlock(self._lock_fd)
        self._lock_fd = None

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

    def gists(self, level: int, start_index: int, end_index: int) -> Tensor:
        """Gists [start_index, end_index) of level 1 or 2 -> [n, d] in the store's gist dtype."""
        check_gist_level(level)
        check_range(f"LOD{level} gist", start_index, end_index, self.num_entries(level))
        if end_index > self._files[level].count:
            self._drain()  # the gists of pending blocks are made on demand
        return self._files[level].read_tensor(start_index, end_index)

    def gather_gists(self, level: int, indices: Tensor) -> Tensor:
        """Gists of level 1 or 2 at ``indices`` [n] (any order, repeats allowed) -> [n, d] in the store's
        gist dtype, read by fancy indexing on the memory map: the cost follows n, not the index spread."""
        check_gist_level(level)
        idx = check_indices(f"LOD{level} gist", indices, self.num_entries(level))  # int64 [n] on CPU
        if idx.numel() and int(idx.max()) >= self._files[level].count:
            self._drain()  # as in gists(): pending blocks are compressed on demand
        return self._files[level].gather_tensor(idx.numpy())

    def tail_tokens(self) -> Tensor:
        return torch.from_numpy(self._tail.copy()).long()
