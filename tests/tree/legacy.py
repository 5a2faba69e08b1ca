"""Turn a store into what the code before checksums and levels above LOD2 wrote (format 1), for the tests that
old stores still open."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from megacontext.tree.format import HEADER_SIZE, pack_header, unpack_header
from megacontext.tree.layout import META, _meta_checksum


def downgrade_to_v1(root: Path) -> None:
    """Level files 0-2 get version-1 headers (no checksums), ``*.sum`` and LOD3+ files go, meta.json becomes v1."""
    root = Path(root)
    for path in sorted(root.glob("LOD*.ctx")):
        level = int(path.stem[3:])
        if level >= 3:
            path.unlink()
            continue
        with open(path, "r+b") as fh:
            h = unpack_header(fh.read(HEADER_SIZE), path)
            fh.seek(0)
            fh.write(pack_header(replace(h, format_version=1, checksum_rows=0, vocab_size=0)))
    for path in root.glob("LOD*.sum"):
        os.remove(path)
    meta = json.loads((root / META).read_text())
    for key in ("vocab_size", "checksum_rows", "levels", "checksum"):
        meta.pop(key, None)
    meta["format_version"] = 1
    meta["checksum"] = _meta_checksum(meta)
    (root / META).write_text(json.dumps(meta))
