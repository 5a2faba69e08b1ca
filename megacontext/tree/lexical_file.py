"""Segment files of the lexical index (``lex/seg2_<first>_<end>.bin``): layout, memory-mapped reads, streamed writes.

Layout: raw little-endian arrays one after the other, ``terms [U]``, ``offsets int64 [U + 1]``, ``blocks [P]``,
``tf uint8 [P]`` (see :class:`megacontext.tree.lexical.Segment`). The manifest entry of a file names its range,
``U``, ``P``, byte size and CRC-32, and (format 2) the dtypes of ``terms`` and ``blocks``:
- format 1 (the first release): ``terms`` and ``blocks`` int64, blocks are global ids (``base`` 0);
- format 2: ``terms`` and ``blocks`` in the narrowest unsigned dtype that holds them, blocks relative to the
  segment's first block (``base == first``). Both are read; writers only write format 2.

Invariants
- A segment is read as read-only memory maps (:func:`read_segment`): opening costs O(1) per segment and the
  postings occupy page cache the kernel can drop, not process memory.
- :func:`write_merged` writes one segment for adjacent segments (in RAM or mapped) *without materialising
  the result*: the union of terms and the per-term counts are computed first (O(k * U), U <= vocabulary),
  then postings are placed chunk by chunk (``chunk`` postings of output at a time) with ``os.pwrite``, so the
  extra memory of a merge is bounded whatever the segment sizes. A single segment passed alone is rewritten
  in format 2 (the migration of format-1 files, and how an in-RAM segment is written).
- Files are written to ``<name>.tmp``, fsynced (``durable``), then renamed: a file under its final name is
  complete. Only the manifest makes it live (see :mod:`megacontext.tree.lexical_store`).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from megacontext.tree.lexical import Segment, uint_dtype

_V1_DTYPES = ("<i8", "<i8")  # (terms, blocks) of format-1 files
_CRC_CHUNK = 1 << 24  # bytes read per step when checksumming a file


def seg_name(first: int, end: int) -> str:
    """Format-2 file name; format 1 wrote ``seg_...``: a migrating writer never overwrites a file a manifest
    still names."""
    return f"seg2_{first:012d}_{end:012d}.bin"


def entry_dtypes(entry: dict) -> tuple[np.dtype, np.dtype]:
    """(terms dtype, blocks dtype) of a manifest entry (format-1 entries carry none)."""
    t, b = (entry["term_dtype"], entry["block_dtype"]) if "block_dtype" in entry else _V1_DTYPES
    return np.dtype(t).newbyteorder("<"), np.dtype(b).newbyteorder("<")


def expected_bytes(entry: dict) -> int:
    t, b = entry_dtypes(entry)
    return t.itemsize * entry["terms"] + 8 * (entry["terms"] + 1) + (b.itemsize + 1) * entry["postings"]


def file_crc(path: Path) -> int:
    """CRC-32 of a file, read in bounded chunks."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def read_segment(directory: Path, entry: dict, verify: bool = False) -> Segment:
    """Map one segment file read-only (``verify``: also check its CRC, reading it in chunks)."""
    path = directory / entry["file"]
    size = path.stat().st_size
    if size != expected_bytes(entry) or size != entry["bytes"]:
        raise ValueError(f"{path}: {size} bytes, the manifest expects {entry['bytes']}")
    if verify and file_crc(path) != entry["crc"]:
        raise ValueError(f"{path}: CRC mismatch")
    u, p = entry["terms"], entry["postings"]
    tdt, bdt = entry_dtypes(entry)
    mm = np.memmap(path, dtype="u1", mode="r") if size else np.zeros(0, "u1")
    parts, at = [], 0
    for dtype, n in ((tdt, u), (np.dtype("<i8"), u + 1), (bdt, p), (np.dtype("u1"), p)):
        nbytes = n * dtype.itemsize
        parts.append(mm[at: at + nbytes].view(dtype))
        at += nbytes
    base = entry["first"] if "block_dtype" in entry else 0
    return Segment(entry["first"], entry["end"], *parts, base=base)


def _chunk_starts(offsets: np.ndarray, chunk: int) -> np.ndarray:
    """Term indices where output chunks of about ``chunk`` postings start (one term is never split)."""
    p = int(offsets[-1])
    cuts = np.searchsorted(offsets, np.arange(0, max(p, 1), chunk), side="right") - 1
    return np.unique(np.clip(cuts, 0, offsets.shape[0] - 1))


def _search(terms: np.ndarray, value: int, side: str) -> int:
    """``searchsorted`` of one id in ``terms`` without converting the (mapped) array to another dtype."""
    if value > np.iinfo(terms.dtype).max:
        return int(terms.shape[0])
    return int(np.searchsorted(terms, terms.dtype.type(value), side=side))


def write_merged(directory: Path, segs: list[Segment], durable: bool, chunk: int = 1 << 20) -> dict:
    """Write one format-2 segment holding the postings of adjacent ``segs`` (block order); returns its manifest
    entry. Memory: O(k * U) for the term table plus O(chunk) per step (see module docstring)."""
    for a, b in zip(segs, segs[1:], strict=False):
        if a.end != b.first:
            raise ValueError(f"segments [{a.first}, {a.end}) and [{b.first}, {b.end}) are not adjacent")
    first, end = segs[0].first, segs[-1].end
    union = np.unique(np.concatenate([s.terms.astype(np.int64) for s in segs]))  # [U]
    counts = np.zeros((len(segs), union.shape[0]), np.int64)  # [k, U] postings per segment and term
    for i, s in enumerate(segs):
        counts[i, np.searchsorted(union, s.terms.astype(np.int64))] = np.diff(s.offsets)
    offsets = np.concatenate([[0], np.cumsum(counts.sum(0))]).astype(np.int64)  # [U + 1]
    before = np.cumsum(counts, axis=0) - counts  # [k, U] postings of a term in earlier segments
    n_post = int(offsets[-1])
    tdt = uint_dtype(int(union[-1]) if union.shape[0] else 0).newbyteorder("<")
    bdt = uint_dtype(max(end - first - 1, 0)).newbyteorder("<")
    u = union.shape[0]
    head = union.astype(tdt).tobytes() + offsets.astype("<i8").tobytes()
    blocks_at, tf_at = len(head), len(head) + n_post * bdt.itemsize
    path = directory / seg_name(first, end)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, head, 0)
        os.ftruncate(fd, tf_at + n_post)
        starts = _chunk_starts(offsets, chunk)
        for u0, u1 in zip(starts, np.append(starts[1:], u), strict=True):
            lo, hi = int(offsets[u0]), int(offsets[u1])
            if hi == lo:
                continue
            out_b, out_tf = np.empty(hi - lo, bdt), np.empty(hi - lo, np.uint8)
            for i, s in enumerate(segs):
                a, b = _search(s.terms, int(union[u0]), "left"), _search(s.terms, int(union[u1 - 1]), "right")
                pa, pb = int(s.offsets[a]), int(s.offsets[b])
                if pb == pa:
                    continue
                lens = np.diff(s.offsets[a: b + 1])  # [b - a] postings per term of this segment in the chunk
                ui = np.searchsorted(union, s.terms[a:b].astype(np.int64))
                rank = np.arange(pb - pa) - np.repeat(s.offsets[a:b] - pa, lens)  # position within its term
                dest = np.repeat(offsets[ui] - lo + before[i, ui], lens) + rank
                out_b[dest] = s.global_blocks(slice(pa, pb)) - first
                out_tf[dest] = s.tf[pa:pb]
            os.pwrite(fd, out_b.tobytes(), blocks_at + lo * bdt.itemsize)
            os.pwrite(fd, out_tf.tobytes(), tf_at + lo)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    crc = file_crc(tmp)
    os.replace(tmp, path)
    return {"file": path.name, "first": first, "end": end, "terms": u, "postings": n_post,
            "bytes": tf_at + n_post, "crc": crc, "term_dtype": tdt.str, "block_dtype": bdt.str}
