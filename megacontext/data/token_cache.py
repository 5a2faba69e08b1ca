"""Token cache: a corpus tokenised once into one memory-mapped id file plus a JSON index.

Layout of a cache directory
- ``tokens.bin``: every kept document's ids back to back, raw little-endian ``uint16`` (vocab <= 65536) or
  ``uint32``; opened with ``np.memmap`` so opening costs nothing and pages load on demand.
- ``index.json``: format/version, dtype, vocab size, tokenizer fingerprint, total tokens, skip counts, and per
  document ``doc_id``, ``domain``, ``start`` (global token offset), ``length`` and ``meta``. For dialogue,
  ``meta["turn_tokens"]`` holds each turn's first token (doc-relative) in place of the reader's character offsets.

Invariants
- Documents are contiguous and non-overlapping: ``start[i+1] == start[i] + length[i]``, the last ends at
  ``num_tokens``; every kept document has at least one 32-token block (shorter ones are skipped and counted
  under ``"<domain>:too_short"``).
- Deterministic: the same documents and tokenizer give byte-identical files (sorted JSON keys, no paths,
  times or host names). ``index.json`` is written last, so its presence marks a complete cache.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megacontext.core.lod import BLOCK
from megacontext.data.corpora import Document
from megacontext.data.tokenization import (
    encode_texts,
    encode_with_char_map,
    token_dtype,
    tokenizer_fingerprint,
    vocab_size,
)

log = logging.getLogger(__name__)

FORMAT = "megacontext-token-cache"
VERSION = 1
TOKENS_FILE = "tokens.bin"
INDEX_FILE = "index.json"
_BATCH_DOCS = 64  # documents per tokenizer call: enough for the Rust backend to parallelise
_BATCH_CHARS = 32 << 20  # ... but never more than ~32M characters of text in flight


class TokenCacheError(ValueError):
    """A token cache is missing, incomplete, or does not match what the caller expects."""


class TokenCache:
    """Read side of a token cache; build one with :meth:`build`, open one with :meth:`open`."""

    def __init__(self, path: Path, index: dict, tokens: np.ndarray):
        self.path = path
        self.index = index
        self.tokens = tokens  # [num_tokens] memmap (never read into RAM as a whole)
        docs = index["docs"]
        self.doc_starts = np.asarray([d["start"] for d in docs], dtype=np.int64)  # [num_docs]
        self.doc_lengths = np.asarray([d["length"] for d in docs], dtype=np.int64)  # [num_docs]
        self.doc_domains: list[str] = [d["domain"] for d in docs]
        self.doc_ids: list[str] = [d["doc_id"] for d in docs]

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, documents: Iterable[Document], tokenizer, out_dir: str | os.PathLike,
              show_progress: bool = True, skipped: Counter | None = None, overwrite: bool = False) -> TokenCache:
        """Tokenise ``documents`` into ``out_dir`` and open the result.

        ``skipped`` (the Counter the lazy readers fill while ``documents`` is consumed, if any) is merged into
        the index's skip counts once the input is exhausted, so one report covers reader skips and too-short
        documents. Raises TokenCacheError when ``out_dir`` already
        holds a cache (unless ``overwrite``), on duplicate doc ids, or when no document is left.
        """
        out = Path(out_dir)
        if (out / INDEX_FILE).exists() and not overwrite:
            raise TokenCacheError(f"{out} already holds a token cache; pass overwrite=True (--overwrite) to replace it")
        out.mkdir(parents=True, exist_ok=True)
        n_vocab = vocab_size(tokenizer)
        dtype = token_dtype(n_vocab)
        skips: Counter = Counter()  # too-short docs; reader skips are merged in after the readers ran dry
        entries: list[dict] = []
        seen: set[str] = set()
        offset = 0
        tmp_tokens = out / (TOKENS_FILE + ".tmp")
        bar = tqdm(desc="tokenising", unit="doc", disable=not show_progress)
        try:
            with open(tmp_tokens, "wb") as f:
                for batch in _batches(documents):
                    for doc, ids, turn_tokens in _encode_batch(batch, tokenizer, dtype):
                        if doc.doc_id in seen:
                            raise TokenCacheError(f"duplicate doc_id {doc.doc_id!r}: doc ids must be unique "
                                                  "(the train/val split hashes them)")
                        seen.add(doc.doc_id)
                        if len(ids) < BLOCK:
                            log.debug("%s: %d tokens < one %d-token block, skipped", doc.doc_id, len(ids), BLOCK)
                            skips[f"{doc.domain}:too_short"] += 1
                            continue
                        meta = dict(doc.meta)
                        if turn_tokens is not None:
                            meta.pop("turn_chars")
                            meta["turn_tokens"] = turn_tokens.tolist()
                        entries.append({"doc_id": doc.doc_id, "domain": doc.domain, "start": offset,
                                        "length": len(ids), "meta": meta})
                        ids.tofile(f)
                        offset += len(ids)
                    bar.update(len(batch))
                    bar.set_postfix(tokens=f"{offset:,}")
        except BaseException:
            tmp_tokens.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        skips.update(skipped or {})
        if not entries:
            tmp_tokens.unlink(missing_ok=True)
            raise TokenCacheError(f"no documents left to cache (skipped: {dict(sorted(skips.items())) or 'none'}); "
                                  "check the input paths")
        (out / INDEX_FILE).unlink(missing_ok=True)  # an overwritten cache is invalid until the new index lands
        os.replace(tmp_tokens, out / TOKENS_FILE)
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": n_vocab,
                 "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "num_tokens": offset,
                 "skipped": dict(sorted(skips.items())), "docs": entries}
        tmp_index = out / (INDEX_FILE + ".tmp")
        tmp_index.write_text(json.dumps(index, sort_keys=True, ensure_ascii=False, separators=(",", ":")),
                             encoding="utf-8")
        os.replace(tmp_index, out / INDEX_FILE)
        log.info("cached %d documents, %d tokens (%s) in %s", len(entries), offset, dtype.name, out)
        return cls.open(out)

    # ------------------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenCache:
        path = Path(path)
        index_path = path / INDEX_FILE
        if not index_path.is_file():
            raise TokenCacheError(f"{path} is not a token cache: {INDEX_FILE} missing (run `megacontext data prepare`)")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise TokenCacheError(f"{index_path}: format {index.get('format')!r} v{index.get('version')!r}, "
                                  f"expected {FORMAT!r} v{VERSION}")
        dtype = np.dtype(index["dtype"])
        tokens_path = path / TOKENS_FILE
        expected = index["num_tokens"] * dtype.itemsize
        actual = tokens_path.stat().st_size if tokens_path.is_file() else -1
        if actual != expected:
            raise TokenCacheError(f"{tokens_path}: {actual} bytes, expected {expected} "
                                  f"({index['num_tokens']} x {dtype.name}); the cache is incomplete or corrupt")
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(index["num_tokens"],))
        return cls(path, index, tokens)

    # ------------------------------------------------------------------- read
    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.index["skipped"])

    def _check(self, i: int) -> int:
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document index {i} out of range for a cache of {self.num_docs} documents")
        return i % self.num_docs

    def doc_tokens(self, i: int) -> np.ndarray:
        """Token ids of document ``i``: a read-only view into the memmap (no copy)."""
        i = self._check(i)
        start = self.doc_starts[i]
        return self.tokens[start:start + self.doc_lengths[i]]

    def doc_info(self, i: int) -> dict:
        """Index entry of document ``i`` (doc_id, domain, start, length, meta); a copy, safe to modify."""
        return json.loads(json.dumps(self.index["docs"][self._check(i)]))

    def tokens_per_domain(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for domain, n in zip(self.doc_domains, self.doc_lengths.tolist(), strict=True):
            out[domain] = out.get(domain, 0) + n
        return dict(sorted(out.items()))

    def docs_per_domain(self) -> dict[str, int]:
        return dict(sorted(Counter(self.doc_domains).items()))

    def turn_token_spans(self, i: int) -> np.ndarray:
        """``[n_turns, 2]`` doc-relative token ranges ``[start, end)`` of each dialogue turn; turns tile the doc."""
        i = self._check(i)
        starts = self.index["docs"][i]["meta"].get("turn_tokens")
        if starts is None:
            raise TokenCacheError(f"document {i} ({self.doc_ids[i]!r}, domain {self.doc_domains[i]!r}) has no turns")
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.append(starts[1:], self.doc_lengths[i])
        return np.stack([starts, ends], axis=1)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise TokenCacheError unless ``tokenizer`` is the one this cache was built with."""
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.index["tokenizer_fingerprint"]:
            raise TokenCacheError(f"{self.path} was built with tokenizer {self.index['tokenizer_fingerprint']}, "
                                  f"but the given tokenizer is {fp}; rebuild the cache with this tokenizer")

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r}, docs={self.num_docs}, tokens={self.num_tokens})"


def _batches(documents: Iterable[Document]):
    batch: list[Document] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_batch(batch: list[Document], tokenizer, dtype: np.dtype):
    """Yield ``(doc, ids, turn_tokens or None)`` in input order; dialogue docs go through the offset path."""
    plain = [d for d in batch if "turn_chars" not in d.meta]
    plain_ids = iter(encode_texts(tokenizer, [d.text for d in plain], dtype)) if plain else iter(())
    for doc in batch:
        if "turn_chars" in doc.meta:
            ids, turn_tokens = encode_with_char_map(tokenizer, doc.text, doc.meta["turn_chars"], dtype)
            yield doc, ids, turn_tokens
        else:
            yield doc, next(plain_ids), None

