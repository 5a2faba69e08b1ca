"""Token cache: layout, byte-identical rebuilds, memmap reads, skips, dialogue turn spans, clear errors."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from megacontext.core.lod import BLOCK
from megacontext.data.corpora import Document, read_book_parts, read_python_sources, read_text_documents
from megacontext.data.qmsum import read_qmsum
from megacontext.data.token_cache import TokenCache, TokenCacheError
from megacontext.data.tokenization import token_dtype


def _docs(corpus, skipped=None):
    return itertools.chain(read_book_parts(corpus["books"], skipped=skipped),
                           read_text_documents(corpus["docs"], skipped=skipped),
                           read_qmsum(corpus["qmsum"], skipped=skipped),
                           read_python_sources(corpus["code"], skipped=skipped))


@pytest.fixture
def cache(corpus, tokenizer, tmp_path):
    skipped = Counter()
    return TokenCache.build(_docs(corpus, skipped), tokenizer, tmp_path / "cache", show_progress=False,
                            skipped=skipped)


def test_build_layout_and_counts(cache, tokenizer):
    assert cache.index["dtype"] == "uint16" and cache.tokens.dtype == np.uint16
    assert isinstance(cache.tokens, np.memmap)
    assert cache.docs_per_domain() == {"books": 7, "code": 2, "dialogue": 3}
    assert cache.skipped == {"books:empty": 1, "books:too_short": 1}
    # documents tile the token file in order
    ends = cache.doc_starts + cache.doc_lengths
    assert cache.doc_starts[0] == 0 and (cache.doc_starts[1:] == ends[:-1]).all() and ends[-1] == cache.num_tokens
    assert (cache.doc_lengths >= BLOCK).all()
    assert sum(cache.tokens_per_domain().values()) == cache.num_tokens
    # every document's tokens are exactly its text's tokenisation, without special tokens
    info = cache.doc_info(5)
    assert info["doc_id"] == "Author_Long_Book"
    text = cache.doc_tokens(5)
    assert isinstance(text, np.memmap)
    assert tokenizer.decode(text.tolist()) == (cache.path.parent / "corpus" / "dev" / "Author_Long_Book.txt"
                                               ).read_text().strip()
    cache.check_tokenizer(tokenizer)


def test_rebuild_is_byte_identical(corpus, tokenizer, tmp_path, cache):
    skipped = Counter()
    again = TokenCache.build(_docs(corpus, skipped), tokenizer, tmp_path / "again", show_progress=False,
                             skipped=skipped)
    for name in ("tokens.bin", "index.json"):
        assert (cache.path / name).read_bytes() == (again.path / name).read_bytes(), name


def test_turn_spans_map_back_to_turn_text(cache, tokenizer, corpus):
    i = cache.doc_ids.index("qmsum/val/Meet001")
    spans = cache.turn_token_spans(i)
    raw = json.loads((corpus["qmsum"][0] / "val" / "Meet001.json").read_text())["meeting_transcripts"]
    assert spans.shape == (len(raw), 2)
    assert spans[0, 0] == 0 and spans[-1, 1] == cache.doc_lengths[i] and (spans[1:, 0] == spans[:-1, 1]).all()
    toks = cache.doc_tokens(i)
    for (a, b), turn in zip(spans, raw, strict=True):
        assert tokenizer.decode(toks[a:b].tolist()).rstrip("\n") == f"{turn['speaker']}: {turn['content']}"
    meta = cache.doc_info(i)["meta"]
    assert "turn_chars" not in meta and meta["queries"]["specific"][0]["relevant_text_span"] == [[1, 2], [5, 5]]
    with pytest.raises(TokenCacheError, match="has no turns"):
        cache.turn_token_spans(0)


def test_open_does_not_read_tokens_and_rejects_bad_dirs(cache, tmp_path):
    reopened = TokenCache.open(cache.path)
    assert isinstance(reopened.tokens, np.memmap) and reopened.num_tokens == cache.num_tokens
    with pytest.raises(TokenCacheError, match="index.json missing"):
        TokenCache.open(tmp_path)
    with open(cache.path / "tokens.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(TokenCacheError, match="incomplete or corrupt"):
        TokenCache.open(cache.path)


def test_build_errors(cache, tokenizer, tmp_path):
    doc = Document("same", "books", "some words " * 40)
    with pytest.raises(TokenCacheError, match="already holds"):
        TokenCache.build([doc], tokenizer, cache.path, show_progress=False)
    with pytest.raises(TokenCacheError, match="duplicate doc_id 'same'"):
        TokenCache.build([doc, doc], tokenizer, tmp_path / "dup", show_progress=False)
    with pytest.raises(TokenCacheError, match="no documents left.*too_short"):
        TokenCache.build([Document("x", "books", "hi")], tokenizer, tmp_path / "short", show_progress=False)
    assert not (tmp_path / "dup" / "tokens.bin.tmp").exists()


def test_check_tokenizer_rejects_other_tokenizer(cache):
    from tests.data.conftest import _bpe_tokenizer

    with pytest.raises(TokenCacheError, match="rebuild the cache"):
        cache.check_tokenizer(_bpe_tokenizer(vocab=300))


def test_token_dtype():
    assert token_dtype(16384) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32
    with pytest.raises(ValueError, match="positive"):
        token_dtype(0)
