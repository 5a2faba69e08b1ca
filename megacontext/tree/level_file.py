"""One level file on disk: append rows, make them durable, publish the count, read rows through a memory map.

Commit protocol (per file; the store orders the files): ``append_rows`` writes rows past the published
count with ``pwrite`` (staged, invisible to readers), ``sync`` fsyncs them, ``publish`` rewrites the header
with the new count (then fsyncs again). A process killed anywhere in between leaves a file whose header
still names the old count, so reopening sees exactly the old rows; the staged bytes after them are
ignored, and truncated away when the file is opened for writing.

Reads go through ``numpy.memmap`` over the published rows only, re-created lazily when the count grows, and
return copies, so RAM use does not grow with the file and callers never hold views into a mapping that
may be replaced.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from megacontext.tree.format import DTYPES, HEADER_SIZE, Header, TreeFormatError, pack_header, unpack_header

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class LevelFile:
    """An open ``LODk.ctx``. ``count`` is the published (committed) row count."""

    def __init__(self, path: Path, fd: int, header: Header, writable: bool, durable: bool):
        self.path, self._fd, self.header = path, fd, header
        self.writable, self.durable = writable, durable
        self._staged = 0  # rows written past the published count, not yet published
        self._map: np.memmap | None = None
        self._mapped = 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: Path, header: Header, durable: bool = True) -> LevelFile:
        """Create (or replace) ``path`` holding only a header with count 0."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        header = header.with_count(0)
        _pwrite_all(fd, pack_header(header), 0)
        if durable:
            os.fsync(fd)
        return cls(path, fd, header, writable=True, durable=durable)

    @classmethod
    def open(cls, path: Path, level: int, writable: bool, durable: bool = True) -> LevelFile:
        """Open and validate; refuses foreign/corrupt files and files missing committed rows."""
        if not path.is_file():
            raise TreeFormatError(path, "file", "missing; expected a level file of a MegaContext store")
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            header = unpack_header(os.pread(fd, HEADER_SIZE, 0), path)
            if header.level != level:
                raise TreeFormatError(path, "level", f"{header.level}; file name says level {level}")
            size = os.fstat(fd).st_size
            rows_present = (size - HEADER_SIZE) // header.row_bytes
            if rows_present < header.entry_count:
                raise TreeFormatError(
                    path, "entry_count",
                    f"header commits {header.entry_count} rows but the file ({size} bytes) holds only "
                    f"{rows_present} complete rows; the file was truncated or damaged after it was committed")
            end = HEADER_SIZE + header.entry_count * header.row_bytes
            if size > end:
                # rows staged by an interrupted commit: never published, so never seen
                log.info("%s: ignoring %d bytes of uncommitted rows", path, size - end)
                if writable:
                    os.ftruncate(fd, end)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header, writable=writable, durable=durable)

    def close(self) -> None:
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------ writing
    @property
    def count(self) -> int:
        return self.header.entry_count

    @property
    def staged(self) -> int:
        return self._staged

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path} is open read-only")

    def append_rows(self, rows: np.ndarray) -> None:
        """Stage rows [n, row_width] (storage dtype) after the published and already staged rows."""
        self._require_writable()
        h = self.header
        if rows.ndim != 2 or rows.shape[1] != h.row_width or rows.dtype != h.storage_dtype:
            raise ValueError(f"{self.path}: rows must be [n, {h.row_width}] {h.storage_dtype}, "
                             f"got {tuple(rows.shape)} {rows.dtype}")
        if rows.shape[0] == 0:
            return
        offset = HEADER_SIZE + (self.count + self._staged) * h.row_bytes
        _pwrite_all(self._fd, np.ascontiguousarray(rows).data, offset)  # one syscall for the batch
        self._staged += rows.shape[0]

    def sync(self) -> None:
        if self.durable and self.writable:
            os.fsync(self._fd)

    def publish(self, count: int | None = None) -> None:
        """Make rows [0, count) committed (default: everything staged). Call ``sync`` first."""
        self._require_writable()
        count = self.count + self._staged if count is None else count
        self.write_header(self.header.with_count(count))
        self._staged = 0

    def write_header(self, header: Header) -> None:
        """Rewrite the header in place (count publication or a metadata change such as a new fingerprint)."""
        self._require_writable()
        _pwrite_all(self._fd, pack_header(header), 0)
        if self.durable:
            os.fsync(self._fd)
        self.header = header

    def trim(self, count: int) -> None:
        """Drop committed rows past ``count`` (reconciling levels after an interrupted commit). A read-only
        handle only stops seeing them; the file is left for the next writer to repair."""
        if count >= self.count:
            return
        if self.writable:
            self.write_header(self.header.with_count(count))
            os.ftruncate(self._fd, HEADER_SIZE + count * self.header.row_bytes)
        else:
            self.header = self.header.with_count(count)
        self._map, self._mapped = None, 0

    # ------------------------------------------------------------------ reading
    def read(self, start: int, end: int) -> np.ndarray:
        """Committed rows [start, end) as a fresh array [end-start, row_width] (storage dtype)."""
        if not 0 <= start <= end <= self.count:
            raise IndexError(f"{self.path}: rows [{start}, {end}) outside the {self.count} committed rows")
        if start == end:
            return np.empty((0, self.header.row_width), dtype=self.header.storage_dtype)
        return np.array(self._mapping(end)[start:end])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Committed rows at ``rows`` (int64 [n], any order, repeats allowed) -> a fresh [n, row_width] array.
        Fancy indexing on the map touches only the pages of the rows asked for."""
        if rows.size == 0:
            return np.empty((0, self.header.row_width), dtype=self.header.storage_dtype)
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= self.count:
            raise IndexError(f"{self.path}: row {lo if lo < 0 else hi} outside the {self.count} committed rows")
        return self._mapping(hi + 1)[rows]  # fancy indexing copies

    def _mapping(self, end: int) -> np.memmap:
        if self._map is None or self._mapped < end:
            self._map = np.memmap(self.path, dtype=self.header.storage_dtype, mode="r", offset=HEADER_SIZE,
                                  shape=(self.count, self.header.row_width))
            self._mapped = self.count
        return self._map

    def _as_tensor(self, rows: np.ndarray) -> Tensor:
        t = torch.from_numpy(rows)
        if self.header.level == 0:
            return t.long()
        return t.view(DTYPES[self.header.dtype][2])

    def read_tensor(self, start: int, end: int) -> Tensor:
        """Rows as a torch tensor in the level's logical dtype (int64 token ids at LOD0)."""
        return self._as_tensor(self.read(start, end))

    def gather_tensor(self, rows: np.ndarray) -> Tensor:
        """:meth:`gather` as a torch tensor in the level's logical dtype."""
        return self._as_tensor(self.gather(rows))
