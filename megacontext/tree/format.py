"""Binary layout of one level file (``LOD0.ctx``, ``LOD1.ctx``, ``LOD2.ctx``, ...): header + fixed-width rows.

A level file is a 256-byte little-endian header followed by ``entry_count`` rows of identical width, so
row ``i`` starts at ``HEADER_SIZE + i * row_bytes`` and can be read through a memory map without parsing
anything else. LOD0 rows are 32 int32 token ids; gist rows are ``dim`` float16/bfloat16/float32 values.

Format versions: 2 (written by this code) carries payload checksums — rows are grouped into chunks of
``checksum_rows``; each complete chunk's digest lives in the level's ``LODk.sum`` file
(:mod:`megacontext.tree.checksum`) and the digest of the last, partial chunk in this header, so publishing
a count publishes the matching digest in the same sector write. Version 1 (stores made before checksums)
is read as before, with ``checksum_rows = 0`` (no checksums); a version-1 file keeps version 1 when appended
to, since a checksum over data nobody verified would vouch for it.

Header fields (offset, size):

====  ====  ===================  =====================================================================
off   size  field                meaning
====  ====  ===================  =====================================================================
0     8     magic                ``b"MEGACTX\\0"``; anything else is a foreign file
8     4     format_version       layout version (this module writes 2 and reads 1 and 2)
12    4     level                0..MAX_LEVEL; must match the file name
16    4     block_size           32 (the design's fixed fan-out)
20    4     dim                  embedding width d of the base model (LOD0 records it too, for checks)
24    4     dtype_code           1=int32 (tokens), 2=float16, 3=bfloat16, 4=float32
28    4     reserved             zero
32    8     entry_count          rows published (committed); rows past it are ignored on open
40    32    fingerprint          base-model fingerprint, ASCII, zero padded
72    64    compressor_version   compressor version, UTF-8, zero padded (empty for LOD0)
136   4     checksum_rows        rows per checksum chunk (version 2; 0 = no checksums)
140   4     vocab_size           LOD0: token ids must lie in [0, vocab_size) (0 = not recorded); else 0
144   8     tail_digest          digest of the rows of the last, partial chunk (version 2)
152   100   reserved             zero
252   4     header_checksum      CRC-32 of bytes [0, 252)
====  ====  ===================  =====================================================================

Validation order is magic -> format_version -> header_checksum -> semantic fields, so a foreign file is
called foreign, a newer file is called newer, and any other corruption is caught by the checksum (CRC-32
detects every error burst of up to 32 bits). Publishing a new count rewrites the 256-byte header in one
``pwrite`` at offset 0; a header fits in one disk sector, so it is replaced whole or not at all.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from megacontext.core.lod import MAX_LEVEL

MAGIC = b"MEGACTX\x00"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_SIZE = 256
DIGEST_SIZE = 8  # bytes of one chunk digest (blake2b-64: error detection, not cryptographic trust)
_CHECKSUM_OFFSET = HEADER_SIZE - 4
_FP_BYTES = 32
_VERSION_BYTES = 64
_LAYOUT = struct.Struct(f"<8sIIIIIIQ{_FP_BYTES}s{_VERSION_BYTES}sII{DIGEST_SIZE}s")  # up to tail_digest

# (name, offset, size): lets errors, docs and tests agree on which byte belongs to which field
FIELDS: tuple[tuple[str, int, int], ...] = (
    ("magic", 0, 8),
    ("format_version", 8, 4),
    ("level", 12, 4),
    ("block_size", 16, 4),
    ("dim", 20, 4),
    ("dtype_code", 24, 4),
    ("reserved", 28, 4),
    ("entry_count", 32, 8),
    ("fingerprint", 40, _FP_BYTES),
    ("compressor_version", 72, _VERSION_BYTES),
    ("checksum_rows", 136, 4),
    ("vocab_size", 140, 4),
    ("tail_digest", 144, DIGEST_SIZE),
    ("reserved", 152, _CHECKSUM_OFFSET - 152),
    ("header_checksum", _CHECKSUM_OFFSET, 4),
)

TOKEN_DTYPE = "int32"
# dtype name -> (code, numpy storage dtype, torch dtype). bfloat16 is stored as int16 bit patterns
# because numpy has no bfloat16; torch reinterprets them with .view().
DTYPES: dict[str, tuple[int, np.dtype, torch.dtype]] = {
    "int32": (1, np.dtype("<i4"), torch.int32),
    "float16": (2, np.dtype("<f2"), torch.float16),
    "bfloat16": (3, np.dtype("<i2"), torch.bfloat16),
    "float32": (4, np.dtype("<f4"), torch.float32),
}
GIST_DTYPES = ("float16", "bfloat16", "float32")
_CODE_TO_NAME = {code: name for name, (code, _, _) in DTYPES.items()}


class TreeFormatError(ValueError):
    """A store file is corrupt, foreign, truncated below its committed rows, or inconsistent with its peers.

    ``path`` names the file and ``field`` the header field (or pseudo-field such as ``"file_size"``)."""

    def __init__(self, path: str | Path, field: str, detail: str):
        self.path, self.field = str(path), field
        super().__init__(f"{self.path}: bad {field}: {detail}")


@dataclass(frozen=True)
class Header:
    level: int
    dim: int
    dtype: str  # a key of DTYPES
    entry_count: int
    fingerprint: str
    compressor_version: str
    block_size: int = 32
    format_version: int = FORMAT_VERSION
    checksum_rows: int = 0  # 0: no checksums (version 1)
    vocab_size: int = 0  # LOD0 only; 0: not recorded
    tail_digest: bytes = bytes(DIGEST_SIZE)

    @property
    def row_width(self) -> int:
        """Values per row: 32 token ids at LOD0, ``dim`` gist components above."""
        return self.block_size if self.level == 0 else self.dim

    @property
    def storage_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][1]

    @property
    def row_bytes(self) -> int:
        return self.row_width * self.storage_dtype.itemsize

    def with_count(self, n: int, tail_digest: bytes | None = None) -> Header:
        return replace(self, entry_count=n, tail_digest=self.tail_digest if tail_digest is None else tail_digest)


def _pad(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > size or b"\x00" in raw:
        raise ValueError(f"{what} {text!r} must be at most {size} UTF-8 bytes without NUL; got {len(raw)} bytes")
    return raw.ljust(size, b"\x00")


def pack_header(h: Header) -> bytes:
    """Header -> exactly HEADER_SIZE bytes with its checksum."""
    v2 = h.format_version >= 2  # version 1 kept these bytes zero
    body = _LAYOUT.pack(MAGIC, h.format_version, h.level, h.block_size, h.dim, DTYPES[h.dtype][0], 0,
                        h.entry_count, _pad(h.fingerprint, _FP_BYTES, "fingerprint"),
                        _pad(h.compressor_version, _VERSION_BYTES, "compressor_version"),
                        h.checksum_rows if v2 else 0, h.vocab_size if v2 else 0,
                        h.tail_digest if v2 else bytes(DIGEST_SIZE))
    body = body.ljust(_CHECKSUM_OFFSET, b"\x00")
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_header(raw: bytes, path: str | Path) -> Header:
    """Parse and structurally validate a header; raises TreeFormatError naming ``path`` and the field."""
    if len(raw) < HEADER_SIZE:
        raise TreeFormatError(path, "file_size", f"{len(raw)} bytes is shorter than the {HEADER_SIZE}-byte header")
    raw = raw[:HEADER_SIZE]
    (magic, version, level, block, dim, code, _, count, fp, cver, chunk, vocab, tail) = _LAYOUT.unpack_from(raw)
    if magic != MAGIC:
        raise TreeFormatError(path, "magic", f"{magic!r} is not {MAGIC!r}; not a MegaContext level file")
    if version not in READABLE_VERSIONS:
        raise TreeFormatError(path, "format_version", f"{version}; this code reads versions {READABLE_VERSIONS}")
    (stored,) = struct.unpack_from("<I", raw, _CHECKSUM_OFFSET)
    actual = zlib.crc32(raw[:_CHECKSUM_OFFSET])
    if stored != actual:
        raise TreeFormatError(path, "header_checksum", f"stored {stored:#010x} != computed {actual:#010x}")
    # past the checksum the fields are what was written; these checks catch writer bugs and odd files
    if level > MAX_LEVEL:
        raise TreeFormatError(path, "level", f"{level}; expected 0..{MAX_LEVEL}")
    if block != 32:
        raise TreeFormatError(path, "block_size", f"{block}; expected 32")
    if code not in _CODE_TO_NAME:
        raise TreeFormatError(path, "dtype_code", f"{code}; expected one of {sorted(_CODE_TO_NAME)}")
    dtype = _CODE_TO_NAME[code]
    if (level == 0) != (dtype == TOKEN_DTYPE):
        raise TreeFormatError(path, "dtype_code", f"{dtype} at level {level}; LOD0 holds int32, gists a float type")
    if dim <= 0:
        raise TreeFormatError(path, "dim", f"{dim}; expected a positive embedding width")
    if version >= 2 and chunk <= 0:
        raise TreeFormatError(path, "checksum_rows", f"{chunk}; a version-2 file has positive checksum chunks")
    if version < 2:
        chunk, vocab, tail = 0, 0, bytes(DIGEST_SIZE)
    try:
        fingerprint = fp.rstrip(b"\x00").decode("ascii")
        compressor_version = cver.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError as e:
        raise TreeFormatError(path, "fingerprint", f"undecodable text ({e})") from e
    return Header(level=level, dim=dim, dtype=dtype, entry_count=count, fingerprint=fingerprint,
                  compressor_version=compressor_version, block_size=block, format_version=version,
                  checksum_rows=chunk, vocab_size=vocab if level == 0 else 0, tail_digest=tail)


def field_at(offset: int) -> str:
    """Name of the header field that byte ``offset`` belongs to."""
    for name, start, size in FIELDS:
        if start <= offset < start + size:
            return name
    raise ValueError(f"offset {offset} is outside the {HEADER_SIZE}-byte header")
