"""Payload checksums of a level file: chunk digests and the ``LODk.sum`` file that holds them.

Rows of a level file are grouped into chunks of ``checksum_rows`` rows (a store-wide setting recorded in
every version-2 header). A chunk's digest is BLAKE2b-64 (:mod:`hashlib`) of its rows' bytes, personalised
with the level and the chunk index, so a chunk copied to another place or level does not verify either.

Where digests live
- Complete chunks never change (level files are append-only), so their digests are appended to
  ``LODk.sum``: a 32-byte header (magic, version, level, chunk rows, CRC-32 of the header) and one 8-byte
  record per chunk. Records are staged (written and fsynced) before the level file's header publishes the
  count that completes their chunks, exactly like rows: records past ``count // checksum_rows`` belong to an
  interrupted commit, are ignored on open and truncated by the next writer.
- The last, partial chunk changes with every commit; its digest is in the level file's header
  (``tail_digest``), written in the same sector write as the count it describes, so the two never disagree.

Digests are computed incrementally (:class:`ChunkHasher` keeps a running BLAKE2b state of the partial chunk),
so a commit hashes only the rows it adds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path

from megacontext.tree.format import DIGEST_SIZE, TreeFormatError

log = logging.getLogger(__name__)

SUM_MAGIC = b"MCSUM\x00\x00\x00"
SUM_VERSION = 1
SUM_HEADER = 32
_SUM_LAYOUT = struct.Struct("<8sIIIQ")  # magic, version, level, checksum_rows, reserved; then CRC-32 at 28


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def new_hash(level: int, chunk: int):
    """A BLAKE2b-64 state for chunk ``chunk`` of level ``level`` (personalised, so chunks cannot be swapped)."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE, person=struct.pack("<BQ", level, chunk))


def chunk_digest(data: bytes | memoryview, level: int, chunk: int) -> bytes:
    h = new_hash(level, chunk)
    h.update(data)
    return h.digest()


class ChunkHasher:
    """Running digests of a growing level file: feed appended rows' bytes in order; complete chunks come out
    of :meth:`feed`, the partial chunk's digest from :meth:`tail_digest`. ``copy`` lets a commit work on a
    copy that replaces the original only once the commit is published."""

    def __init__(self, level: int, chunk_rows: int, row_bytes: int, rows: int = 0, state=None):
        self.level, self.chunk_rows, self.row_bytes = level, chunk_rows, row_bytes
        self.rows = rows  # rows fed so far (the file's row count)
        self._h = state if state is not None else new_hash(level, rows // chunk_rows)

    @classmethod
    def resume(cls, level: int, chunk_rows: int, row_bytes: int, rows: int, partial: bytes) -> ChunkHasher:
        """A hasher for a file of ``rows`` rows whose partial chunk holds ``partial`` (its bytes)."""
        h = cls(level, chunk_rows, row_bytes, rows - len(partial) // row_bytes)
        h.feed(partial)
        return h

    def copy(self) -> ChunkHasher:
        return ChunkHasher(self.level, self.chunk_rows, self.row_bytes, self.rows, self._h.copy())

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """Append rows' bytes; returns the digests of the chunks they complete, in order."""
        view, done = memoryview(data).cast("B"), []
        while len(view):
            room = (self.chunk_rows - self.rows % self.chunk_rows) * self.row_bytes
            take = view[:room]
            self._h.update(take)
            self.rows += len(take) // self.row_bytes
            view = view[len(take):]
            if self.rows % self.chunk_rows == 0:
                done.append(self._h.digest())
                self._h = new_hash(self.level, self.rows // self.chunk_rows)
        return done

    def tail_digest(self) -> bytes:
        return self._h.digest()


def _pack_sum_header(level: int, chunk_rows: int) -> bytes:
    body = _SUM_LAYOUT.pack(SUM_MAGIC, SUM_VERSION, level, chunk_rows, 0).ljust(SUM_HEADER - 4, b"\x00")
    return body + struct.pack("<I", zlib.crc32(body))


class SumFile:
    """An open ``LODk.sum``: the digests of a level file's complete chunks. ``records`` is how many are
    present on disk (published ones and possibly staged ones past them)."""

    def __init__(self, path: Path, fd: int, level: int, chunk_rows: int, records: int, writable: bool):
        self.path, self._fd, self.level, self.chunk_rows = path, fd, level, chunk_rows
        self.records, self.writable = records, writable

    @classmethod
    def create(cls, path: Path, level: int, chunk_rows: int, durable: bool) -> SumFile:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(fd, _pack_sum_header(level, chunk_rows), 0)
        if durable:
            os.fsync(fd)
        return cls(path, fd, level, chunk_rows, 0, True)

    @classmethod
    def open(cls, path: Path, level: int, chunk_rows: int, needed: int, writable: bool) -> SumFile:
        """Open and validate; ``needed`` = complete chunks the level file publishes (their digests must be here).
        A writable open drops records past ``needed`` (staged by an interrupted commit)."""
        if not path.is_file():
            raise TreeFormatError(path, "file", f"missing; the checksums of {path.with_suffix('.ctx').name} "
                                  "live here (a damaged store: run megacontext fsck)")
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            raw = os.pread(fd, SUM_HEADER, 0)
            if len(raw) < SUM_HEADER or raw[:8] != SUM_MAGIC:
                raise TreeFormatError(path, "magic", "not a MegaContext checksum file (or its header is damaged)")
            (stored,) = struct.unpack_from("<I", raw, SUM_HEADER - 4)
            if stored != zlib.crc32(raw[:SUM_HEADER - 4]):
                raise TreeFormatError(path, "header_checksum", "the checksum file's header is damaged")
            _, version, lv, rows, _ = _SUM_LAYOUT.unpack_from(raw)
            if (version, lv, rows) != (SUM_VERSION, level, chunk_rows):
                raise TreeFormatError(path, "header", f"version {version}, level {lv}, {rows} rows per chunk; "
                                      f"expected {SUM_VERSION}, {level}, {chunk_rows}")
            size = os.fstat(fd).st_size
            records = (size - SUM_HEADER) // DIGEST_SIZE
            if records < needed:
                raise TreeFormatError(path, "records", f"holds {records} chunk digests but its level file commits "
                                      f"{needed} complete chunks; the file was truncated or damaged")
            if records > needed and writable:
                os.ftruncate(fd, SUM_HEADER + needed * DIGEST_SIZE)
                records = needed
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, level, chunk_rows, records, writable)

    def read(self, chunk: int) -> bytes:
        return os.pread(self._fd, DIGEST_SIZE, SUM_HEADER + chunk * DIGEST_SIZE)

    def write(self, first: int, digests: list[bytes]) -> None:
        """Stage digests of chunks ``first, first + 1, ...`` (invisible until the level file publishes them)."""
        if digests:
            pwrite_all(self._fd, b"".join(digests), SUM_HEADER + first * DIGEST_SIZE)
            self.records = max(self.records, first + len(digests))

    def truncate(self, records: int) -> None:
        if records < self.records and self.writable:
            os.ftruncate(self._fd, SUM_HEADER + records * DIGEST_SIZE)
        self.records = min(self.records, records)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
