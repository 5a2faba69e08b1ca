"""The full check of a tree (``megacontext fsck`` reads the tree part from here): every chunk of every level file
against its checksum, every LOD0 id against the vocabulary, every gist for non-finite values, and the files
against each other and ``meta.json``; the lexical index (``lex/``), if present, against its CRCs and LOD0.

Opening a store verifies only what it must before anything is read (headers, the last chunks, the
cross-file counts), and reads verify the chunks they touch (:mod:`megacontext.tree.level_file`); this check
reads everything, reports every problem instead of stopping at the first, and changes nothing.

Outcomes: ``problems`` are damage (the store, or the part named, cannot be trusted); ``notes`` are states a
healthy store can be in (rows of an interrupted commit that the next writer drops, a store made before
checksums: "no checksums", levels a pre-LOD3 store will get when next opened for writing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megacontext.core.lod import MAX_LEVEL
from megacontext.tree.format import TreeFormatError
from megacontext.tree.layout import BASE_LEVELS, META, existing_levels, level_name, needed_rows, read_meta
from megacontext.tree.level_file import LevelFile, sum_path
from megacontext.tree.lexical_store import LEX_DIR, check_lexical


@dataclass
class IntegrityReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was read in full, one line per file

    @property
    def ok(self) -> bool:
        return not self.problems

    def merge(self, other: IntegrityReport) -> None:
        self.problems += other.problems
        self.notes += other.notes
        self.checked += other.checked


def _scan_values(f: LevelFile, vocab: int | None, report: IntegrityReport) -> None:
    """Out-of-vocabulary ids (LOD0) or non-finite values (gists), reported per file with the first rows."""
    bad_rows: list[int] = []
    for first, rows in f.scan():
        if f.header.level == 0:
            bad = ((rows < 0) | (rows >= vocab)).any(axis=1) if vocab else (rows < 0).any(axis=1)
        else:
            values = rows.view(np.int16).astype(np.int32) << 16 if f.header.dtype == "bfloat16" else rows
            values = values.view(np.float32) if f.header.dtype == "bfloat16" else values
            bad = ~np.isfinite(values).all(axis=1)
        bad_rows += (np.flatnonzero(bad) + first).tolist()
    if bad_rows:
        what = f"token ids outside the vocabulary of {vocab}" if f.header.level == 0 and vocab else \
            "negative token ids" if f.header.level == 0 else "non-finite gists"
        report.problems.append(f"{f.path}: {what} in {len(bad_rows)} rows (first: {bad_rows[:5]})")


def check_tree(root: str | Path, vocab_size: int | None = None) -> IntegrityReport:
    """Check every file of the tree at ``root``; ``vocab_size`` is used when the store records none."""
    root = Path(root)
    report = IntegrityReport(root)
    meta = None
    try:
        meta = read_meta(root)
    except TreeFormatError as e:
        report.problems.append(str(e))
    legacy = meta is not None and meta.get("format_version") == 1
    levels = max(existing_levels(root), BASE_LEVELS)
    files: list[LevelFile | None] = []
    try:
        for lv in range(levels):
            try:
                f = LevelFile.open(root / level_name(lv), lv, writable=False, verify=False)
            except TreeFormatError as e:
                report.problems.append(str(e))
                files.append(None)
                continue
            files.append(f)
            if f.discarded_bytes:
                report.notes.append(f"{f.path.name}: {f.discarded_bytes} bytes of rows an interrupted commit never "
                                    "published (ignored; the next writer drops them)")
            if f.checksummed:
                n = f.verify_all(on_error=lambda e: report.problems.append(str(e)))
                report.checked.append(f"{f.path.name}: {f.count} rows, {n} checksum chunks")
            else:
                report.notes.append(f"{f.path.name}: no checksums (made before format 2): damage to its rows "
                                    "cannot be detected")
                report.checked.append(f"{f.path.name}: {f.count} rows, no checksums")
            vocab = (f.header.vocab_size or (meta or {}).get("vocab_size") or vocab_size) if lv == 0 else None
            _scan_values(f, vocab, report)
        _cross_check(root, files, meta, legacy, report)
        lod0_ok = files[0] is not None and not any(files[0].path.name in p for p in report.problems)
        if lod0_ok and (root / LEX_DIR).exists():  # the lexical index, re-derived from a sound LOD0
            problems, notes, checked = check_lexical(root, files[0].read, files[0].count)
            report.merge(IntegrityReport(root, problems, notes, checked))
        elif (root / LEX_DIR).exists():
            report.notes.append(f"{LEX_DIR}: not checked (LOD0 is damaged; the index is derived from it)")
    finally:
        for f in files:
            if f is not None:
                f.close()
    return report


def _cross_check(root: Path, files: list[LevelFile | None], meta: dict | None, legacy: bool,
                 report: IntegrityReport) -> None:
    lod0 = files[0]
    if lod0 is None:
        return
    n0, h0 = lod0.count, lod0.header
    for lv, f in enumerate(files[1:], start=1):
        if f is None:
            continue
        need = needed_rows(lv, n0)
        if f.count < need:
            report.problems.append(f"{f.path}: {f.count} gists, but LOD0's {n0} blocks need {need}")
        elif f.count > need:
            report.notes.append(f"{f.path.name}: {f.count - need} gists of an interrupted commit (dropped on open)")
        if (f.header.dim, f.header.fingerprint) != (h0.dim, h0.fingerprint):
            report.problems.append(f"{f.path}: dim/fingerprint {f.header.dim}/{f.header.fingerprint!r} differ from "
                                   f"LOD0's {h0.dim}/{h0.fingerprint!r}")
    for lv in range(len(files), MAX_LEVEL + 1):
        if needed_rows(lv, n0) == 0:
            break
        if legacy:
            report.notes.append(f"{level_name(lv)}: absent (a store made before levels above LOD2); the next "
                                "writable open builds it")
        else:
            report.problems.append(f"{root / level_name(lv)}: missing; LOD0's {n0} blocks need "
                                   f"{needed_rows(lv, n0)} LOD{lv} gists")
    for lv in range(len(files), MAX_LEVEL + 1):  # checksum files whose level file is gone
        if sum_path(root / level_name(lv)).is_file() and needed_rows(lv, n0):
            report.problems.append(f"{root / level_name(lv)}: missing, but its checksum file exists")
    if meta is None:
        return
    blocks, tail = meta.get("num_blocks"), meta.get("tail", [])
    if not isinstance(blocks, int) or blocks > n0:
        report.problems.append(f"{root / META}: describes {blocks} blocks but LOD0 commits {n0}")
    elif blocks < n0 and tail:
        report.notes.append(f"{META}: a tail of {len(tail)} tokens from an older commit (dropped on open)")
    vocab = h0.vocab_size or meta.get("vocab_size")
    if vocab and any(t >= vocab for t in tail):
        report.problems.append(f"{root / META}: tail token ids outside the vocabulary of {vocab}")
    if h0.vocab_size and meta.get("vocab_size") not in (None, h0.vocab_size):
        report.problems.append(f"{root / META}: vocab_size {meta.get('vocab_size')} differs from LOD0's "
                               f"{h0.vocab_size}")
