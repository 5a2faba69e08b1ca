"""Corpus readers: turn files on disk into a stream of :class:`Document`.

Every reader validates its paths eagerly (a missing path raises ``FileNotFoundError`` at call time, not at
the first ``next()`` deep inside a long prepare run) and then returns a lazy iterator, so multi-GB corpora
are never held in memory as a whole.

Bad-input policy (one rule for every reader):
- bytes that are not valid UTF-8 are decoded with ``errors="replace"`` and a warning is logged; the
  document is kept because a handful of U+FFFD characters does not harm LM training;
- empty (or whitespace-only) documents and unreadable / malformed files are skipped with a warning;
- every skip is counted in the optional ``skipped`` Counter under ``"<domain>:<reason>"`` so callers can
  report totals. Documents shorter than one 32-token block are skipped later, at tokenisation time
  (:mod:`megacontext.data.token_cache`), because only then is their length known.

Doc ids are relative (file stem / part index / path below the source root), never absolute paths, so a cache
built from the same inputs elsewhere is byte-identical and the train/val split (a hash of the doc id) is stable.
"""

from __future__ import annotations

import logging
import lzma
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BOOK_SEPARATOR = b"\x1e"
_READ_CHUNK = 1 << 22  # 4 MiB of decompressed text per read while scanning an .xz part
# directory names never read as code: test suites are huge and atypical, installed packages are not stdlib
CODE_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass
class Document:
    """One document of a corpus. ``meta`` must be JSON-serialisable (it is stored in the cache index)."""

    doc_id: str
    domain: str
    text: str
    meta: dict = field(default_factory=dict)


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD with a warning naming ``where`` (documented policy)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning("%s: invalid UTF-8 at byte %d (%s); decoding with replacement characters", where, e.start, e.reason)
        return data.decode("utf-8", errors="replace")


def existing_paths(paths: Iterable[str | os.PathLike], what: str) -> list[Path]:
    out = [Path(p) for p in paths]
    missing = [str(p) for p in out if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{what}: path(s) do not exist: {missing}")
    return out


def tally_skip(skipped: Counter | None, domain: str, reason: str) -> None:
    if skipped is not None:
        skipped[f"{domain}:{reason}"] += 1


def _split_stream(path: Path) -> Iterator[bytes]:
    """Yield the raw pieces of an (optionally .xz) file separated by BOOK_SEPARATOR, reading in chunks."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rb") as f:
        rest = b""
        while chunk := f.read(_READ_CHUNK):
            pieces = (rest + chunk).split(BOOK_SEPARATOR)
            rest = pieces.pop()  # possibly incomplete: wait for the next chunk
            yield from pieces
        yield rest


def read_book_parts(paths: Iterable[str | os.PathLike], skipped: Counter | None = None,
                    domain: str = "books") -> Iterator[Document]:
    """Books from ``train_*.txt.xz`` parts (plain text also accepted): books separated by the byte 0x1E.

    Doc ids are ``<part stem>/<index>`` where index counts the non-empty books of the part.
    """
    parts = existing_paths(paths, "book parts")

    def gen() -> Iterator[Document]:
        for part in parts:
            stem = part.name.split(".")[0]
            index = 0
            try:
                for raw in _split_stream(part):
                    text = decode_text(raw, f"{part} book {index}").strip()
                    if not text:
                        tally_skip(skipped, domain, "empty")
                        continue
                    yield Document(f"{stem}/{index:04d}", domain, text, {"source": part.name})
                    index += 1
            except (lzma.LZMAError, EOFError) as e:
                log.warning("%s: unreadable compressed data after %d books (%s); skipping the rest", part, index, e)
                tally_skip(skipped, domain, "corrupt_part")

    return gen()


def expand_files(roots: list[Path], suffix: str) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        files.extend(sorted(root.rglob(f"*{suffix}")) if root.is_dir() else [root])
    return files


def read_text_documents(paths: Iterable[str | os.PathLike], domain: str = "books",
                        skipped: Counter | None = None) -> Iterator[Document]:
    """One document per text file (directories are searched recursively for ``*.txt``); doc id = file stem."""
    files = expand_files(existing_paths(paths, "text documents"), ".txt")

    def gen() -> Iterator[Document]:
        for path in files:
            text = decode_text(path.read_bytes(), str(path)).strip()
            if not text:
                log.warning("%s: empty document, skipped", path)
                tally_skip(skipped, domain, "empty")
                continue
            yield Document(path.stem, domain, text, {"source": path.name})

    return gen()


def default_code_root() -> Path:
    """The running interpreter's standard-library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_python_sources(roots: Iterable[str | os.PathLike] | None = None, domain: str = "code",
                        skipped: Counter | None = None) -> Iterator[Document]:
    """One document per ``.py`` file below each root (default: the stdlib), skipping CODE_SKIP_DIRS.

    Doc ids are ``<root name>/<relative path>`` so the same tree gives the same ids on any machine.
    """
    root_list = existing_paths([default_code_root()] if roots is None else roots, "code roots")

    def gen() -> Iterator[Document]:
        for root in root_list:
            if root.is_file():
                walk = [(str(root.parent), [], [root.name])]
                base = root.parent
            else:
                walk = os.walk(root)
                base = root
            for dirpath, dirnames, filenames in walk:
                dirnames[:] = sorted(d for d in dirnames if d not in CODE_SKIP_DIRS)  # prune + fix order
                for name in sorted(filenames):
                    if not name.endswith(".py"):
                        continue
                    path = Path(dirpath) / name
                    try:
                        data = path.read_bytes()
                    except OSError as e:
                        log.warning("%s: unreadable (%s), skipped", path, e)
                        tally_skip(skipped, domain, "unreadable")
                        continue
                    text = decode_text(data, str(path))
                    if not text.strip():
                        tally_skip(skipped, domain, "empty")
                        continue
                    rel = path.relative_to(base).as_posix()
                    yield Document(f"{base.name}/{rel}", domain, text, {"source": rel})

    return gen()


def capped(docs: Iterable[Document], max_chars: int) -> Iterator[Document]:
    """Documents until ``max_chars`` characters in all (0 = no cap); the last one is cut to fit."""
    if max_chars <= 0:
        yield from docs
        return
    used = 0
    for doc in docs:
        if used >= max_chars:
            return
        doc.text = doc.text[: max_chars - used]
        used += len(doc.text)
        yield doc
