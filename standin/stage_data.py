"""Stage what a GPU call carries for the stand-in run: train books within a byte budget, and a few dev books.

usage (repo root, on the CPU machine):
  python -m standin.stage_data --books ../shared/data/books/train_03.txt.xz --dev ../shared/data/books/dev \
      --out carry/standin [--budget-bytes N] [--skip-books K] [--dev-books 4]

Writes ``OUT/books.txt.xz`` (whole books from ``--books``, in file order after skipping ``--skip-books``,
each compressed as its own xz stream with the strongest preset; a file of concatenated streams reads as one
text) and ``OUT/dev/*.txt.xz`` (``--dev-books`` held-out dev books, spread over the sorted list: for the
EVALUATION only). The default budget is what the 64 MiB travelling tree leaves after the repo's tracked
files and the dev books, minus a margin; the command prints the arithmetic. A later call stages other
books with ``--skip-books`` (the count printed by the previous call).
"""

from __future__ import annotations

import argparse
import lzma
import subprocess
import sys
from pathlib import Path

from standin.corpus import read_text, split_books

TREE_LIMIT = 64 * 1024 * 1024  # the device tool's limit on the travelling working tree
MARGIN = 300_000  # room for code and notes written after staging
SEP = "\n\n\x1e\n\n"
PRESET = 9 | lzma.PRESET_EXTREME


def tracked_bytes(repo: Path) -> int:
    """Bytes of the working tree that travels (tracked + untracked-not-ignored files), outside ``carry/``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    total = 0
    for name in out.decode().split("\0"):
        p = repo / name
        if name and p.is_file():
            total += p.stat().st_size
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m standin.stage_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--books", nargs="+", required=True, help="train book files (never the dev books)")
    p.add_argument("--dev", required=True, help="the dev book folder (evaluation only)")
    p.add_argument("--out", default="carry/standin")
    p.add_argument("--budget-bytes", type=int, default=0, help="bytes for train books (default: what fits)")
    p.add_argument("--skip-books", type=int, default=0)
    p.add_argument("--dev-books", type=int, default=4)
    a = p.parse_args(argv)
    if any("dev" in Path(b).resolve().parts for b in a.books):
        print("error: --books names a dev book; those are for evaluation only", file=sys.stderr)
        return 2
    out, repo = Path(a.out), Path.cwd()
    (out / "dev").mkdir(parents=True, exist_ok=True)
    for old in (out / "dev").glob("*.txt.xz"):
        old.unlink()
    dev_files = sorted(Path(a.dev).glob("*.txt"))
    if not dev_files:
        print(f"error: no .txt books in {a.dev}", file=sys.stderr)
        return 2
    step = max(1, len(dev_files) // max(1, a.dev_books))
    dev_bytes = 0
    for f in dev_files[::step][: a.dev_books]:
        data = lzma.compress(f.read_bytes(), preset=PRESET)
        (out / "dev" / (f.name + ".xz")).write_bytes(data)
        dev_bytes += len(data)
    tree = tracked_bytes(repo)
    budget = a.budget_bytes or TREE_LIMIT - tree - dev_bytes - MARGIN
    if budget <= 0:
        print(f"error: no room for books: tree {tree:,} + dev {dev_bytes:,} bytes of {TREE_LIMIT:,}", file=sys.stderr)
        return 2
    books = [b for f in a.books for b in split_books(read_text(f))][a.skip_books:]
    used, n, streams = 0, 0, []
    for b in books:
        data = lzma.compress((b + SEP).encode("utf-8"), preset=PRESET)
        if used + len(data) > budget:
            break
        streams.append(data)
        used += len(data)
        n += 1
    (out / "books.txt.xz").write_bytes(b"".join(streams))
    chars = sum(len(b) for b in books[:n])
    print(f"books: {n} books ({chars:,} chars, about {chars / 3.65 / 1e6:.1f}M tokens) in {used:,} bytes; "
          f"next call: --skip-books {a.skip_books + n}")
    print(f"dev: {min(a.dev_books, len(dev_files))} books in {dev_bytes:,} bytes")
    print(f"tree {tree:,} + carry {used + dev_bytes:,} = {tree + used + dev_bytes:,} of {TREE_LIMIT:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
