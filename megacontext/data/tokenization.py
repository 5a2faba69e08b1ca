"""Tokenizer adapter for the data pipeline: any Hugging Face tokenizer (fast or slow) or a raw ``tokenizers.Tokenizer``.

Design choices
- No special tokens are ever added: the cache holds the text's own tokens, document boundaries live in the
  index, and windows never cross them, so no BOS/EOS is needed to separate documents.
- Fast tokenizers are driven through their Rust backend's ``encode_batch`` (parallel, no "sequence longer than
  model_max_length" warnings for book-length inputs) and give character offsets, which map dialogue turns
  to token offsets exactly as the whole text is tokenised.
- Slow tokenizers have no offsets; dialogue documents are then tokenised turn by turn and concatenated, which
  can differ from whole-text tokenisation at turn boundaries (logged once).
- ``tokenizer_fingerprint`` hashes the tokenizer's full serialised definition (or its vocabulary), so a cache
  can be checked against the base model's tokenizer before training reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)
_warned_slow = False


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself when raw), or None for slow tokenizers."""
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


def vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can emit, added tokens included."""
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def token_dtype(n_vocab: int) -> np.dtype:
    """Narrowest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    if n_vocab <= 0:
        raise ValueError(f"tokenizer vocabulary size must be positive, got {n_vocab}")
    if n_vocab > 2**32:
        raise ValueError(f"tokenizer vocabulary of {n_vocab} ids does not fit uint32")
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """Short stable hash of the tokenizer definition (model, normaliser, pre-tokeniser, added tokens)."""
    backend = _backend(tokenizer)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def encode_texts(tokenizer, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token ids of each text (no special tokens) as arrays of ``dtype``."""
    backend = _backend(tokenizer)
    if backend is not None:
        encs = backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=dtype) for e in encs]
    return [np.asarray(tokenizer.encode(t, add_special_tokens=False), dtype=dtype) for t in texts]


def encode_with_char_map(tokenizer, text: str, char_starts: Sequence[int], dtype: np.dtype
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise ``text`` and map segment start characters to token offsets.

    Segments tile the text (``char_starts`` increasing, first 0). Returns ``(ids, token_starts)`` where segment
    ``s`` owns tokens ``[token_starts[s], token_starts[s+1])`` (last one: to the end): each token belongs to the
    segment holding its first character, so a token straddling a boundary goes to the earlier segment.
    """
    chars = np.asarray(char_starts, dtype=np.int64)
    backend = _backend(tokenizer)
    if backend is not None:
        enc = backend.encode_batch([text], add_special_tokens=False)[0]
        ids = np.asarray(enc.ids, dtype=dtype)
        tok_chars = np.asarray([o[0] for o in enc.offsets], dtype=np.int64).reshape(-1)
        # byte-level pieces of one character may repeat an offset; keep the sequence monotone for searchsorted
        tok_chars = np.maximum.accumulate(tok_chars) if tok_chars.size else tok_chars
        return ids, np.searchsorted(tok_chars, chars, side="left").astype(np.int64)
    global _warned_slow
    if not _warned_slow:
        log.warning("slow tokenizer %s has no offsets: tokenising dialogue turn by turn", type(tokenizer).__name__)
        _warned_slow = True
    bounds = np.append(chars, len(text))
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    encoded = encode_texts(tokenizer, pieces, dtype)
    lengths = np.asarray([len(e) for e in encoded], dtype=np.int64)
    ids = np.concatenate(encoded) if encoded else np.zeros(0, dtype=dtype)
    return ids, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
