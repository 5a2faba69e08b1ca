"""The lexical index on disk, beside the level files: ``lex/`` in the store directory.

Files
- ``lex/seg_<first>_<end>.bin``: one immutable segment (see :class:`megacontext.tree.lexical.Segment`) as raw
  little-endian arrays one after the other: ``terms`` int64 [U], ``offsets`` int64 [U + 1], ``blocks`` int64
  [P], ``tf`` uint8 [P]. Read through a memory map, so opening costs O(segments), not O(postings).
- ``lex/index.json``: the manifest: format version, the BM25 config, ``num_blocks`` (the index covers LOD0
  blocks ``[0, num_blocks)``) and per segment its file name, range, ``U``, ``P``, byte size and CRC-32, plus a
  CRC-32 of the manifest itself. Replaced atomically (temp file, fsync, rename, fsync the directory).

Consistency with the store's commit contract
- The index is *derived* from LOD0 and always lags it: :meth:`StoredLexicalIndex.persist` runs inside
  ``MegaContextTree.flush`` after LOD0 and ``meta.json`` are durable, and persists only committed blocks. A
  crash at any point leaves a manifest describing a prefix of the committed LOD0 (or the previous manifest).
- Segment files are written and fsynced before the manifest that names them; files no manifest names (a
  crash between the two, or segments replaced by a merge) are deleted by the next writer.
- Opening: a manifest that is missing, unreadable, fails its checksum, names a missing or wrongly sized
  file, or covers more blocks than LOD0 commits, is discarded and the index rebuilt from LOD0 (noted in the
  tree's ``recovery``); a manifest that covers fewer blocks than LOD0 is caught up by indexing the missing
  blocks. So an index can always be recovered from LOD0, and the cost of a normal open is the gap only.
- ``fsck`` (:func:`check_lexical`) re-reads every segment against its CRC and re-indexes LOD0 to compare
  postings counts; it changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from megacontext.core.lod import BLOCK
from megacontext.tree.level_file import fsync_dir
from megacontext.tree.lexical import BM25Config, LexicalIndex, Segment

log = logging.getLogger(__name__)

LEX_DIR = "lex"
MANIFEST = "index.json"
LEX_VERSION = 1
_READ_CHUNK = 8192  # blocks read from LOD0 per step when (re)building


def _manifest_crc(body: dict) -> int:
    return zlib.crc32(json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True).encode())


def _seg_name(seg: Segment) -> str:
    return f"seg_{seg.first:012d}_{seg.end:012d}.bin"


def _arrays(seg: Segment) -> list[np.ndarray]:
    return [seg.terms.astype("<i8"), seg.offsets.astype("<i8"), seg.blocks.astype("<i8"), seg.tf.astype("u1")]


def write_segment(directory: Path, seg: Segment, durable: bool) -> dict:
    path = directory / _seg_name(seg)
    tmp = path.with_suffix(".tmp")
    crc = 0
    with open(tmp, "wb") as fh:
        for a in _arrays(seg):
            b = np.ascontiguousarray(a).tobytes()
            crc = zlib.crc32(b, crc)
            fh.write(b)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "first": seg.first, "end": seg.end, "terms": int(seg.terms.shape[0]),
            "postings": seg.num_postings, "bytes": path.stat().st_size, "crc": crc}


def _expected_bytes(entry: dict) -> int:
    return 8 * (2 * entry["terms"] + 1) + 9 * entry["postings"]


def read_segment(directory: Path, entry: dict, verify: bool = False) -> Segment:
    """Map one segment file (``verify``: also check its CRC, reading it all)."""
    path = directory / entry["file"]
    size = path.stat().st_size
    if size != _expected_bytes(entry) or size != entry["bytes"]:
        raise ValueError(f"{path}: {size} bytes, the manifest expects {entry['bytes']}")
    if verify and zlib.crc32(path.read_bytes()) != entry["crc"]:
        raise ValueError(f"{path}: CRC mismatch")
    u, p = entry["terms"], entry["postings"]
    mm = np.memmap(path, dtype="u1", mode="r") if size else np.zeros(0, "u1")
    parts, at = [], 0
    for dtype, n in (("<i8", u), ("<i8", u + 1), ("<i8", p), ("u1", p)):
        nbytes = n * np.dtype(dtype).itemsize
        parts.append(mm[at: at + nbytes].view(dtype))
        at += nbytes
    return Segment(entry["first"], entry["end"], *parts)


def read_manifest(directory: Path) -> dict:
    body = json.loads((directory / MANIFEST).read_text())
    if body.get("format_version") != LEX_VERSION:
        raise ValueError(f"lexical index format {body.get('format_version')!r}; this code reads {LEX_VERSION}")
    if body.get("checksum") != _manifest_crc(body):
        raise ValueError("manifest checksum mismatch")
    return body


class StoredLexicalIndex(LexicalIndex):
    """A :class:`LexicalIndex` persisted in ``<store>/lex`` (see module docstring)."""

    def __init__(self, directory: Path, cfg: BM25Config, writable: bool, durable: bool):
        super().__init__(cfg)
        self.directory, self.writable, self.durable = directory, writable, durable
        self._entries: dict[tuple[int, int], dict] = {}  # (first, end) -> manifest entry of segments on disk
        self.persisted_blocks = 0

    @classmethod
    def open(cls, root: Path, lod0_blocks, committed: int, writable: bool, durable: bool,
             cfg: BM25Config | None = None) -> tuple[StoredLexicalIndex, list[str]]:
        """Open (or create, or rebuild) the index of a store with ``committed`` LOD0 blocks; ``lod0_blocks(a, b)``
        reads blocks [a, b) as int [n, 32]. Returns (index, recovery notes)."""
        d = Path(root) / LEX_DIR
        idx, notes = cls(d, cfg or BM25Config(), writable, durable), []
        if (d / MANIFEST).is_file():
            try:
                body = read_manifest(d)
                if body["num_blocks"] > committed:
                    raise ValueError(f"covers {body['num_blocks']} blocks, LOD0 commits {committed}")
                idx.cfg = BM25Config.from_dict(body["bm25"]) if cfg is None else idx.cfg
                segs = [read_segment(d, e) for e in body["segments"]]
                ends = [0] + [s.end for s in segs]
                if any(s.first != e for s, e in zip(segs, ends, strict=False)) or ends[-1] != body["num_blocks"]:
                    raise ValueError("segments do not tile the indexed blocks")
                idx.segments = segs
                idx._entries = {(e["first"], e["end"]): e for e in body["segments"]}
                idx.persisted_blocks = body["num_blocks"]
            except (ValueError, KeyError, TypeError, OSError) as e:
                notes.append(f"{LEX_DIR}/{MANIFEST}: {e}; lexical index rebuilt from LOD0")
                log.warning("%s: %s", d, notes[-1])
                idx.segments, idx._entries, idx.persisted_blocks = [], {}, 0
        idx.catch_up(lod0_blocks, committed)
        if writable:
            idx.persist(committed)
        return idx, notes

    def catch_up(self, lod0_blocks, end: int) -> None:
        """Index blocks ``[num_blocks, end)`` read through ``lod0_blocks(a, b)``, in bounded chunks."""
        for a in range(self.num_blocks, end, _READ_CHUNK):
            b = min(a + _READ_CHUNK, end)
            self.add(a, np.asarray(lod0_blocks(a, b), dtype=np.int64).reshape(-1, BLOCK))

    def sync(self, source, persist: bool = False) -> None:
        """Index every complete block ``source`` holds (committed or pending) that is not indexed yet;
        ``persist``: then write what ``source`` (a store) has committed."""
        n = source.num_entries(0)
        if n > self.num_blocks:
            self.catch_up(lambda a, b: source.tokens(a * BLOCK, b * BLOCK).numpy(), n)
        if persist:
            self.persist(source.num_committed_blocks)

    def persist(self, committed: int) -> None:
        """Write the segments of committed blocks not on disk yet, then the manifest, then drop stale files."""
        if not self.writable:
            return
        self.directory.mkdir(exist_ok=True)
        entries = []
        for seg in self.segments:
            if seg.end > committed:
                break
            key = (seg.first, seg.end)
            if key not in self._entries:
                self._entries[key] = write_segment(self.directory, seg, self.durable)
            entries.append(self._entries[key])
        n = entries[-1]["end"] if entries else 0
        if n == self.persisted_blocks and (self.directory / MANIFEST).is_file():
            return
        if self.durable:
            fsync_dir(self.directory)
        body = {"format_version": LEX_VERSION, "num_blocks": n, "bm25": self.cfg.to_dict(), "segments": entries}
        body["checksum"] = _manifest_crc(body)
        tmp = self.directory / (MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(body, fh)
            if self.durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.directory / MANIFEST)
        if self.durable:
            fsync_dir(self.directory)
        self.persisted_blocks = n
        live = {e["file"] for e in entries}
        self._entries = {k: e for k, e in self._entries.items() if e["file"] in live}
        for f in self.directory.glob("seg_*"):
            if f.name not in live:
                f.unlink(missing_ok=True)


def open_lexical(tree) -> StoredLexicalIndex | None:
    """The lexical index of an opened :class:`~megacontext.tree.store.MegaContextTree` (created, caught up or
    rebuilt as needed; what was repaired is added to ``tree.recovery``). A read-only opener of a store that
    has none gets None rather than an O(history) build at open (policies then index what they read)."""
    if not tree.writable and not (Path(tree.root) / LEX_DIR / MANIFEST).is_file():
        return None
    lod0 = tree._files[0]
    idx, notes = StoredLexicalIndex.open(tree.root, lod0.read, lod0.count, tree.writable, tree.config.durable)
    tree.recovery += notes
    return idx


def check_lexical(root: Path, lod0_blocks, committed: int) -> tuple[list[str], list[str], list[str]]:
    """fsck of ``<store>/lex``: (problems, notes, checked). A missing index is a note (it is rebuilt on open)."""
    d = Path(root) / LEX_DIR
    if not (d / MANIFEST).is_file():
        return [], [f"{LEX_DIR}: no lexical index (built from LOD0 when the store is next opened)"], []
    problems: list[str] = []
    try:
        body = read_manifest(d)
        segs = [read_segment(d, e, verify=True) for e in body["segments"]]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return [f"{d / MANIFEST}: {e} (delete {d}: the next open rebuilds it from LOD0)"], [], []
    n = body["num_blocks"]
    if n > committed:
        problems.append(f"{d}: indexes {n} blocks but LOD0 commits {committed}")
        return problems, [], []
    fresh = LexicalIndex(BM25Config.from_dict(body["bm25"]))
    for a in range(0, n, _READ_CHUNK):
        fresh.add(a, np.asarray(lod0_blocks(a, min(a + _READ_CHUNK, n)), dtype=np.int64).reshape(-1, BLOCK))
    if sum(s.num_postings for s in segs) != fresh.num_postings:
        problems.append(f"{d}: {sum(s.num_postings for s in segs)} postings, re-indexing LOD0 gives "
                        f"{fresh.num_postings} (delete {d}: the next open rebuilds it)")
    notes = [f"{LEX_DIR}: indexes {n} of {committed} committed blocks (caught up on open)"] if n < committed else []
    return problems, notes, [f"{LEX_DIR}: {len(segs)} segments, CRCs ok, {n} blocks"]
