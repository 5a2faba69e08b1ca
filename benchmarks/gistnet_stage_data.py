"""Stage token caches for a GistNet GPU run (the GPU machine has no ../shared): a capped training cache from
book parts 00/01 (interleaved book by book) and a held-out dev-book cache for validation.

    python benchmarks/gistnet_stage_data.py --out carry/tokens            # ~7M train + ~1M dev tokens

Caps keep the carried folder small (uint16 tokens: 2 bytes each). Uses the data pipeline's TokenCache.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

from transformers import AutoTokenizer

from megacontext.core.assets import resolve
from megacontext.data.corpora import capped, read_book_parts, read_text_documents
from megacontext.data.token_cache import TokenCache

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--books", default=str(SHARED), help="folder with train_0*.txt.xz and dev/")
    ap.add_argument("--tokenizer", default="base-llama-19m-v2")
    ap.add_argument("--out", default="carry/tokens")
    ap.add_argument("--train-chars", type=int, default=26_500_000)  # ~7.1M tokens at ~3.7 chars/token
    ap.add_argument("--dev-chars", type=int, default=4_000_000)
    ap.add_argument("--dev-every", type=int, default=4, help="take every k-th dev book (sorted by name)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    tok = AutoTokenizer.from_pretrained(resolve(args.tokenizer))
    books = Path(args.books)
    parts = [read_book_parts([books / f"train_0{i}.txt.xz"]) for i in (0, 1)]
    interleaved = (d for pair in itertools.zip_longest(*parts) for d in pair if d is not None)
    TokenCache.build(capped(interleaved, args.train_chars), tok, Path(args.out) / "train", overwrite=True)
    dev = sorted((books / "dev").glob("*.txt"))[:: args.dev_every]
    TokenCache.build(capped(read_text_documents(dev), args.dev_chars), tok, Path(args.out) / "dev", overwrite=True)


if __name__ == "__main__":
    main()
