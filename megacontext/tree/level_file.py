"""One level file on disk: append rows, make them durable, publish the count, read verified rows.

Commit protocol (per file; the store orders the files): ``append_rows`` writes rows past the published
count with ``pwrite`` (staged, invisible to readers), ``sync`` fsyncs them together with the digests of the
chunks they complete (``LODk.sum``, see :mod:`megacontext.tree.checksum`), ``publish`` rewrites the header
with the new count and the digest of the new partial chunk (then fsyncs again). A process killed anywhere
in between leaves a file whose header still names the old count, so reopening sees exactly the old rows;
the staged bytes (and staged digests) after them are ignored, and truncated away when the file is opened
for writing. ``discarded_bytes`` reports what was ignored, for the store's recovery report.

Integrity (version-2 files): opening verifies the partial last chunk and the last complete chunk against
their digests (a torn or damaged tail is refused before anything reads it); every other chunk is verified
the first time a read touches it, so a read never returns rows that fail their checksum. Chunks this
process wrote itself count as verified. Version-1 files (made before checksums) are read unverified.

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

from megacontext.tree.checksum import ChunkHasher, SumFile, chunk_digest, pwrite_all
from megacontext.tree.format import DTYPES, HEADER_SIZE, Header, TreeFormatError, pack_header, unpack_header

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sum_path(path: Path) -> Path:
    """``LODk.ctx`` -> ``LODk.sum``."""
    return path.with_suffix(".sum")


class LevelFile:
    """An open ``LODk.ctx``. ``count`` is the published (committed) row count."""

    def __init__(self, path: Path, fd: int, header: Header, writable: bool, durable: bool,
                 sums: SumFile | None = None, hasher: ChunkHasher | None = None):
        self.path, self._fd, self.header = path, fd, header
        self.writable, self.durable = writable, durable
        self._sums, self._hasher = sums, hasher
        self._staged = 0  # rows written past the published count, not yet published
        self._staged_hasher: ChunkHasher | None = None  # the hasher including staged rows
        self._staged_digests: list[bytes] = []  # digests of chunks the staged rows complete
        self._ref = (header.entry_count, header.tail_digest)  # (count, partial-chunk digest) the digests describe
        self._verified = np.zeros(0, dtype=bool)  # chunk -> verified in this process
        self._map: np.memmap | None = None
        self._mapped = 0
        self.discarded_bytes = 0  # uncommitted bytes found past the published rows when opened

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: Path, header: Header, durable: bool = True) -> LevelFile:
        """Create (or replace) ``path`` holding only a header with count 0 (and, for a version-2 header, an
        empty ``LODk.sum``; made first, so a level file never exists without its checksum file)."""
        header = header.with_count(0)
        sums = hasher = None
        if header.checksum_rows:
            sums = SumFile.create(sum_path(path), header.level, header.checksum_rows, durable)
            hasher = ChunkHasher(header.level, header.checksum_rows, header.row_bytes)
            header = header.with_count(0, hasher.tail_digest())
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(fd, pack_header(header), 0)
        if durable:
            os.fsync(fd)
        return cls(path, fd, header, writable=True, durable=durable, sums=sums, hasher=hasher)

    @classmethod
    def open(cls, path: Path, level: int, writable: bool, durable: bool = True, verify: bool = True) -> LevelFile:
        """Open and validate; refuses foreign/corrupt files, files missing committed rows, and (version 2) a last
        chunk that fails its checksum. ``verify=False`` skips the checksum step (fsck verifies every chunk
        itself, reporting damage instead of raising at the first)."""
        if not path.is_file():
            raise TreeFormatError(path, "file", "missing; expected a level file of a MegaContext store")
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        sums = None
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
            discarded = size - end
            if discarded > 0:
                # rows staged by an interrupted commit: never published, so never seen
                log.info("%s: ignoring %d bytes of uncommitted rows", path, discarded)
                if writable:
                    os.ftruncate(fd, end)
            f = cls(path, fd, header, writable=writable, durable=durable)
            f.discarded_bytes = discarded
            if header.checksum_rows:
                c = header.checksum_rows
                sums = SumFile.open(sum_path(path), level, c, header.entry_count // c, writable)
                f._sums = sums
                if verify:
                    f._verify_open()
        except BaseException:
            if sums is not None:
                sums.close()
            os.close(fd)
            raise
        return f

    def close(self) -> None:
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._sums is not None:
            self._sums.close()

    # ------------------------------------------------------------------ integrity
    @property
    def checksummed(self) -> bool:
        return self.header.checksum_rows > 0

    def _chunk_rows(self, chunk: int) -> tuple[int, int]:
        c, ref = self.header.checksum_rows, self._ref[0]
        return chunk * c, min((chunk + 1) * c, ref)

    def _chunk_bytes(self, chunk: int) -> bytes:
        a, b = self._chunk_rows(chunk)
        rb = self.header.row_bytes
        data = os.pread(self._fd, (b - a) * rb, HEADER_SIZE + a * rb)
        if len(data) != (b - a) * rb:
            raise TreeFormatError(self.path, "file_size", f"rows {a}..{b - 1} are no longer in the file")
        return data

    def _expected(self, chunk: int) -> tuple[bytes, str]:
        ref_count, tail = self._ref
        if chunk < ref_count // self.header.checksum_rows:
            return self._sums.read(chunk), self._sums.path.name
        return tail, f"{self.path.name}'s header"

    def verify_chunk(self, chunk: int) -> None:
        """Check chunk ``chunk`` against its digest; raises TreeFormatError naming the rows on a mismatch."""
        want, where = self._expected(chunk)
        got = chunk_digest(self._chunk_bytes(chunk), self.header.level, chunk)
        if got != want:
            a, b = self._chunk_rows(chunk)
            raise TreeFormatError(self.path, "checksum",
                                  f"rows {a}..{b - 1} (chunk {chunk}) do not match their checksum in {where}: "
                                  "the file is damaged (run `megacontext fsck` on the store)")
        self._mark(chunk, chunk + 1)

    def _mark(self, lo: int, hi: int) -> None:
        if hi > self._verified.size:
            grown = np.zeros(max(hi, 2 * self._verified.size), dtype=bool)
            grown[: self._verified.size] = self._verified
            self._verified = grown
        self._verified[lo:hi] = True

    def _verify_open(self) -> None:
        """Verify the partial last chunk and the last complete one, and set up the running hasher."""
        c, count = self.header.checksum_rows, self.header.entry_count
        last = count // c
        if last > 0:
            self.verify_chunk(last - 1)
        partial = self._chunk_bytes(last)
        h = ChunkHasher.resume(self.header.level, c, self.header.row_bytes, count, partial)
        if h.tail_digest() != self.header.tail_digest:
            raise TreeFormatError(self.path, "checksum",
                                  f"the last {count - last * c} committed rows (from row {last * c}) do not match the "
                                  "checksum in the file's header: the file is damaged")
        self._mark(last, last + 1)
        self._hasher = h

    def _verify_rows(self, lo_row: int, hi_row: int) -> None:
        """Verify every chunk holding rows [lo_row, hi_row) (inclusive bounds as chunk indices)."""
        if not self.checksummed or hi_row <= lo_row:
            return
        c = self.header.checksum_rows
        lo, hi = lo_row // c, (hi_row - 1) // c + 1
        if hi <= self._verified.size and self._verified[lo:hi].all():
            return
        for chunk in range(lo, hi):
            if chunk >= self._verified.size or not self._verified[chunk]:
                self.verify_chunk(chunk)

    def _verify_gather(self, rows: np.ndarray) -> None:
        if not self.checksummed:
            return
        chunks = np.unique(rows // self.header.checksum_rows)
        known = chunks < self._verified.size
        if known.all() and self._verified[chunks].all():
            return
        for chunk in chunks.tolist():
            if chunk >= self._verified.size or not self._verified[chunk]:
                self.verify_chunk(chunk)

    def verify_all(self, on_error=None) -> int:
        """Verify every committed chunk (fsck). ``on_error(TreeFormatError)`` is called per damaged chunk (default:
        raise). Returns the number of chunks checked."""
        if not self.checksummed:
            return 0
        n = -(-self._ref[0] // self.header.checksum_rows) or 1
        for chunk in range(n):
            try:
                self.verify_chunk(chunk)
            except TreeFormatError as e:
                if on_error is None:
                    raise
                on_error(e)
        return n

    def scan(self, batch_rows: int = 1 << 16):
        """Yield (first row, rows [k, row_width]) over every committed row without checksum verification (fsck's
        value checks: the checksums are verified separately)."""
        for a in range(0, self.count, batch_rows):
            b = min(a + batch_rows, self.count)
            yield a, np.array(self._mapping(b)[a:b])

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
        data = np.ascontiguousarray(rows)
        offset = HEADER_SIZE + (self.count + self._staged) * h.row_bytes
        pwrite_all(self._fd, data.data, offset)  # one syscall for the batch
        self._staged += rows.shape[0]
        if self.checksummed:
            if self._staged_hasher is None:
                self._staged_hasher = self._hasher.copy()
            self._staged_digests += self._staged_hasher.feed(data.data)

    def sync(self) -> None:
        """Write the staged rows' chunk digests, then make rows and digests durable (when ``durable``)."""
        if self._staged_digests:
            self._sums.write(self.count // self.header.checksum_rows, self._staged_digests)
            if self.durable:
                self._sums.sync()
        if self.durable and self.writable:
            os.fsync(self._fd)

    def publish(self) -> None:
        """Make every staged row committed. Call ``sync`` first."""
        self._require_writable()
        count = self.count + self._staged
        tail = None
        if self.checksummed:
            hasher = self._staged_hasher or self._hasher
            tail = hasher.tail_digest()
            first = self.count // self.header.checksum_rows
        self.write_header(self.header.with_count(count, tail))
        if self.checksummed:
            self._hasher, self._ref = hasher, (count, tail)
            self._mark(first, count // self.header.checksum_rows + 1)  # rows this process wrote
        self._staged, self._staged_hasher, self._staged_digests = 0, None, []

    def write_header(self, header: Header) -> None:
        """Rewrite the header in place (count publication or a metadata change such as a new fingerprint)."""
        self._require_writable()
        pwrite_all(self._fd, pack_header(header), 0)
        if self.durable:
            os.fsync(self._fd)
        self.header = header

    def trim(self, count: int) -> None:
        """Drop committed rows past ``count`` (reconciling levels after an interrupted commit). A read-only
        handle only stops seeing them (its checksums still describe the longer file); the file is left for the
        next writer to repair."""
        if count >= self.count:
            return
        if self.writable:
            tail = None
            if self.checksummed:
                c = self.header.checksum_rows
                self._verify_rows(count // c * c, count)  # the rows that stay in the new partial chunk
                partial = os.pread(self._fd, (count - count // c * c) * self.header.row_bytes,
                                   HEADER_SIZE + count // c * c * self.header.row_bytes)
                self._hasher = ChunkHasher.resume(self.header.level, c, self.header.row_bytes, count, partial)
                tail = self._hasher.tail_digest()
                self._sums.truncate(count // c)
                self._ref = (count, tail)
            self.write_header(self.header.with_count(count, tail))
            os.ftruncate(self._fd, HEADER_SIZE + count * self.header.row_bytes)
        else:
            self.header = self.header.with_count(count)
        self._map, self._mapped = None, 0

    # ------------------------------------------------------------------ reading
    def read(self, start: int, end: int) -> np.ndarray:
        """Committed rows [start, end) as a fresh array [end-start, row_width] (storage dtype), verified."""
        if not 0 <= start <= end <= self.count:
            raise IndexError(f"{self.path}: rows [{start}, {end}) outside the {self.count} committed rows")
        if start == end:
            return np.empty((0, self.header.row_width), dtype=self.header.storage_dtype)
        self._verify_rows(start, end)
        return np.array(self._mapping(end)[start:end])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Committed rows at ``rows`` (int64 [n], any order, repeats allowed) -> a fresh [n, row_width] array.
        Fancy indexing on the map touches only the pages of the rows asked for."""
        if rows.size == 0:
            return np.empty((0, self.header.row_width), dtype=self.header.storage_dtype)
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= self.count:
            raise IndexError(f"{self.path}: row {lo if lo < 0 else hi} outside the {self.count} committed rows")
        self._verify_gather(rows)
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
