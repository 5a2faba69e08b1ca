"""``megacontext data prepare`` and ``megacontext data info``: build and inspect token caches."""

from __future__ import annotations

import argparse
import itertools
import logging
from collections import Counter
from pathlib import Path

from megacontext.core.assets import resolve
from megacontext.data.corpora import capped, read_book_parts, read_python_sources, read_text_documents
from megacontext.data.qmsum import read_qmsum
from megacontext.data.token_cache import TokenCache
from megacontext.data.windows import WindowConfig, WindowSampler

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local model/tokenizer directory, an embedded model name or a
    ``tokenizer.json`` file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(resolve(path))
    if p.is_file() and p.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer {path!r}: expected a local directory with tokenizer files or a "
                                "tokenizer.json (nothing is downloaded at run time)")
    return AutoTokenizer.from_pretrained(str(p))


def _print_summary(cache: TokenCache) -> None:
    docs = cache.docs_per_domain()
    print(f"{'domain':<12} {'docs':>8} {'tokens':>14}")
    for domain, n in cache.tokens_per_domain().items():
        print(f"{domain:<12} {docs[domain]:>8,} {n:>14,}")
    print(f"{'total':<12} {cache.num_docs:>8,} {cache.num_tokens:>14,}")
    skipped = cache.skipped
    print("skipped: " + (", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "none"))


def cmd_prepare(args: argparse.Namespace) -> int:
    if not (args.books or args.docs or args.qmsum or args.code is not None):
        raise ValueError("nothing to prepare: give at least one of --books, --docs, --qmsum, --code")
    tokenizer = load_tokenizer(args.tokenizer)
    skipped: Counter = Counter()
    # readers check their paths now, before any tokenising starts
    if args.max_chars < 0:
        raise ValueError(f"--max-chars={args.max_chars} must be >= 0")
    sources = []
    if args.books:
        sources.append(read_book_parts(args.books, skipped=skipped))
    if args.docs:
        sources.append(read_text_documents(args.docs, domain=args.docs_domain, skipped=skipped))
    if args.qmsum:
        sources.append(read_qmsum(args.qmsum, skipped=skipped))
    if args.code is not None:
        sources.append(read_python_sources(args.code or None, skipped=skipped))
    sources = [capped(src, args.max_chars) for src in sources]
    cache = TokenCache.build(itertools.chain(*sources), tokenizer, args.out, show_progress=not args.no_progress,
                             skipped=skipped, overwrite=args.overwrite)
    print(f"token cache: {cache.path} ({cache.index['dtype']}, tokenizer {cache.index['tokenizer_fingerprint']})")
    _print_summary(cache)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    cache = TokenCache.open(args.dir)
    print(f"token cache: {cache.path}")
    print(f"dtype {cache.index['dtype']}, vocab {cache.vocab_size:,}, tokenizer {cache.index['tokenizer_fingerprint']}")
    _print_summary(cache)
    if args.context:
        for split in ("train", "val"):
            cfg = WindowConfig(context=args.context, horizon=args.horizon, split=split, val_fraction=args.val_fraction)
            try:
                n = WindowSampler(cache, cfg).num_windows
            except ValueError:
                n = 0
            print(f"{split}: {n:,} windows of {args.context}+{args.horizon} tokens")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="tokenise corpora into a memory-mapped token cache",
                              description="Tokenise corpora once into DIR (tokens.bin + index.json).")
    p.add_argument("--books", nargs="+", metavar="PATH", help="book parts (train_*.txt.xz; books split by 0x1E)")
    p.add_argument("--docs", nargs="+", metavar="PATH", help="single-document .txt files or directories of them")
    p.add_argument("--docs-domain", default="books", help="domain of --docs documents (default: books)")
    p.add_argument("--qmsum", nargs="+", metavar="DIR", help="QMSum json files or directories (domain dialogue)")
    p.add_argument("--code", nargs="*", metavar="DIR",
                   help="Python source trees (domain code); the flag alone means this interpreter's stdlib")
    p.add_argument("--tokenizer", required=True, help="local tokenizer directory (e.g. the base model) or .json")
    p.add_argument("--out", required=True, help="output cache directory")
    p.add_argument("--max-chars", type=int, default=0,
                   help="at most this many characters from each source flag (books, docs, qmsum, code); 0 = all")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    q = subparsers.add_parser("info", help="summarise a token cache", description="Summarise a token cache.")
    q.add_argument("dir", help="cache directory")
    q.add_argument("--context", type=int, default=0, help="also count train/val windows of this context")
    q.add_argument("--horizon", type=int, default=64, help="horizon for --context (default 64)")
    q.add_argument("--val-fraction", type=float, default=0.05, help="val fraction for --context (default 0.05)")
    q.set_defaults(func=cmd_info)
