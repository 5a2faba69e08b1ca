"""The lexical index on disk, beside the level files: ``lex/`` in the store directory.

Files
- ``lex/seg2_<first>_<end>.bin``: one immutable segment, layout and formats in
  :mod:`megacontext.tree.lexical_file` (format 1, ``seg_*`` with int64 arrays, is still read; a writer
  rewrites it). Read through read-only memory maps, so opening costs O(segments), not O(postings).
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
- Memory: only segments of blocks not yet persisted live in RAM (the unflushed tail, merged there by the LSM
  rule); :meth:`StoredLexicalIndex.persist` writes them, merging with on-disk neighbours by streaming
  (:func:`~megacontext.tree.lexical_file.write_merged`, bounded extra memory), and replaces them by maps. A
  (re)build from LOD0 persists every ``_PERSIST_BLOCKS`` blocks. So resident memory is O(unflushed blocks +
  vocabulary), not O(history); mapped postings are page cache the kernel reclaims.
- ``fsck`` (:func:`check_lexical`) re-reads every segment against its CRC (in chunks) and counts each
  segment's postings from LOD0 in bounded chunks (distinct ids per block); it changes nothing.
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
from megacontext.tree.lexical_file import read_segment, write_merged

log = logging.getLogger(__name__)

LEX_DIR = "lex"
MANIFEST = "index.json"
LEX_VERSION = 2  # written; format 1 (int64 segment files) is read and rewritten by the next writer
READ_VERSIONS = (1, 2)
_READ_CHUNK = 8192  # blocks read from LOD0 per step when (re)building
_PERSIST_BLOCKS = 1 << 17  # a (re)build writes its segments every this many blocks: its RAM stays bounded


def _manifest_crc(body: dict) -> int:
    return zlib.crc32(json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True).encode())


def read_manifest(directory: Path) -> dict:
    body = json.loads((directory / MANIFEST).read_text())
    if body.get("format_version") not in READ_VERSIONS:
        raise ValueError(f"lexical index format {body.get('format_version')!r}; this code reads {READ_VERSIONS}")
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
        idx.catch_up(lod0_blocks, committed, committed)
        if writable:
            idx.persist(committed)
        return idx, notes

    def _mergeable(self, seg: Segment) -> bool:
        return (seg.first, seg.end) not in self._entries  # on-disk segments are merged on disk, by persist

    def _on_disk(self, seg: Segment) -> bool:
        e = self._entries.get((seg.first, seg.end))
        return e is not None and "block_dtype" in e  # format-1 files are rewritten (migrated) by a writer

    def catch_up(self, lod0_blocks, end: int, committed: int = 0) -> None:
        """Index blocks ``[num_blocks, end)`` read through ``lod0_blocks(a, b)``, in bounded chunks; a writer
        persists every ``_PERSIST_BLOCKS`` blocks up to ``committed``, so a rebuild never holds the whole
        index in RAM."""
        last = self.num_blocks
        for a in range(self.num_blocks, end, _READ_CHUNK):
            b = min(a + _READ_CHUNK, end)
            self.add(a, np.asarray(lod0_blocks(a, b), dtype=np.int64).reshape(-1, BLOCK))
            if self.writable and b <= committed and b - last >= _PERSIST_BLOCKS:
                self.persist(b)
                last = b

    def sync(self, source, persist: bool = False) -> None:
        """Index every complete block ``source`` holds (committed or pending) that is not indexed yet;
        ``persist``: then write what ``source`` (a store) has committed."""
        n = source.num_entries(0)
        if n > self.num_blocks:
            self.catch_up(lambda a, b: source.tokens(a * BLOCK, b * BLOCK).numpy(), n,
                          source.num_committed_blocks if persist else 0)
        if persist:
            self.persist(source.num_committed_blocks)

    def _plan(self, segs: list[Segment]) -> list[list[Segment]]:
        """Groups of adjacent segments to become one each, by the LSM rule of ``_compact`` on sizes alone."""
        f, groups = self.cfg.fanout, []
        for seg in segs:
            groups.append([seg])
            while len(groups) >= 2 and (groups[-2][-1].end - groups[-2][0].first
                                        < f * (groups[-1][-1].end - groups[-1][0].first)):
                groups[-2:] = [groups[-2] + groups[-1]]
        return groups

    def persist(self, committed: int) -> None:
        """Write the committed in-RAM segments (merged on disk with their neighbours where the LSM rule says
        so, streaming), switch them to read-only maps, then the manifest, then drop stale files."""
        if not self.writable:
            return
        self.directory.mkdir(exist_ok=True)
        k = 0
        while k < len(self.segments) and self.segments[k].end <= committed:
            k += 1
        out, changed = [], False
        for group in self._plan(self.segments[:k]):
            if len(group) == 1 and self._on_disk(group[0]):
                out.append(group[0])
                continue
            entry = write_merged(self.directory, group, self.durable)
            self._entries[(entry["first"], entry["end"])] = entry
            out.append(read_segment(self.directory, entry))  # the RAM copy is dropped: postings live in page cache
            changed = True
        self.segments[:k] = out
        entries = [self._entries[(s.first, s.end)] for s in out]
        n = entries[-1]["end"] if entries else 0
        if not changed and n == self.persisted_blocks and (self.directory / MANIFEST).is_file():
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
        self._entries = {key: e for key, e in self._entries.items() if e["file"] in live}
        for f in self.directory.glob("seg*"):  # seg_* (format 1), seg2_* and their .tmp files
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


def block_postings(ids) -> int:
    """Postings a batch of blocks ``ids`` [n, 32] makes: the number of distinct ids in each block, summed."""
    x = np.sort(np.asarray(ids, dtype=np.int64).reshape(-1, BLOCK), axis=1)
    return int(x.shape[0] + (np.diff(x, axis=1) != 0).sum())


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
    for seg in segs:  # postings of a segment = distinct ids per block of LOD0, counted in bounded chunks
        want = sum(block_postings(lod0_blocks(a, min(a + _READ_CHUNK, seg.end)))
                   for a in range(seg.first, seg.end, _READ_CHUNK))
        if seg.num_postings != want:
            problems.append(f"{d}: segment [{seg.first}, {seg.end}) holds {seg.num_postings} postings, LOD0 gives "
                            f"{want} (delete {d}: the next open rebuilds it)")
    notes = [f"{LEX_DIR}: indexes {n} of {committed} committed blocks (caught up on open)"] if n < committed else []
    return problems, notes, [f"{LEX_DIR}: {len(segs)} segments, CRCs ok, {n} blocks"]
