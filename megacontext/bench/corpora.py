"""Benchmark inputs from prepared text on disk: dev books, Python standard-library modules, QMSum meetings.

Reading goes through the project's corpus readers (:mod:`megacontext.data`); this module only chooses
documents (sorted ids, so the choice is the same on every machine) and tokenizes them with the base
model's tokenizer. Nothing is downloaded. Texts are cut to ``max_tokens * chars_per_token_cap`` characters
before encoding because the tasks never read further than ``max_tokens``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megacontext.bench.tasks import Encode, Meeting, TokenDoc

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_CAP = 8  # generous: books average ~3.7 chars/token, code ~2.5


def _tokenize(doc_id: str, text: str, encode: Encode, max_tokens: int | None) -> TokenDoc:
    if max_tokens is not None:
        text = text[:max_tokens * CHARS_PER_TOKEN_CAP]
    ids = torch.tensor(encode(text), dtype=torch.long)
    return TokenDoc(doc_id, ids if max_tokens is None else ids[:max_tokens])


def load_books(directory: str | Path, encode: Encode, max_docs: int | None = None,
               max_tokens: int | None = None) -> list[TokenDoc]:
    """Each ``*.txt`` below ``directory`` as one token document, sorted by id."""
    from megacontext.data.corpora import read_text_documents

    docs = sorted(read_text_documents([directory]), key=lambda d: d.doc_id)[:max_docs]
    if not docs:
        raise FileNotFoundError(f"no .txt documents under {str(directory)!r}")
    log.info("tokenizing %d books from %s", len(docs), directory)
    return [_tokenize(d.doc_id, d.text, encode, max_tokens) for d in docs]


def load_code(encode: Encode, root: str | Path | None = None, max_docs: int = 16, min_tokens: int = 8192,
              max_tokens: int | None = None) -> list[TokenDoc]:
    """The ``max_docs`` largest modules (by characters) under ``root`` (default: this interpreter's stdlib)
    that have at least ``min_tokens`` tokens."""
    from megacontext.data.corpora import read_python_sources

    docs = sorted(read_python_sources(None if root is None else [root]), key=lambda d: (-len(d.text), d.doc_id))
    out = []
    for d in docs:
        if len(out) == max_docs or len(d.text) < min_tokens:  # a token is at least one character
            break
        tok = _tokenize(d.doc_id, d.text, encode, None if max_tokens is None else max(max_tokens, min_tokens))
        if tok.tokens.shape[0] >= min_tokens:
            out.append(TokenDoc(tok.doc_id, tok.tokens[:max_tokens]))
    if not out:
        raise FileNotFoundError(f"no Python module with >= {min_tokens} tokens under {root or 'the stdlib'}")
    return sorted(out, key=lambda d: d.doc_id)


def load_meetings(paths: list[str | Path], max_meetings: int | None = None, kinds: tuple[str, ...] = ("specific",
                  "general")) -> list[Meeting]:
    """QMSum meetings (sorted by id) with their queries of the given kinds, in file order."""
    from megacontext.data.qmsum import read_qmsum

    out = []
    for doc in sorted(read_qmsum(paths), key=lambda d: d.doc_id)[:max_meetings]:
        queries = [(q["query"], q["answer"]) for kind in kinds for q in doc.meta["queries"].get(kind, [])
                   if q.get("answer", "").strip()]
        out.append(Meeting(doc.doc_id, doc.text, queries))
    return out
