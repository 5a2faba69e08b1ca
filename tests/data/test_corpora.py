"""Corpus readers: documents, ids, the QMSum turn map, and the bad-input policy (skip or replace, never crash)."""

from __future__ import annotations

import json
import logging
import lzma
from collections import Counter

import pytest

import megacontext.data.corpora as corpora
from megacontext.data.corpora import read_book_parts, read_python_sources, read_text_documents
from megacontext.data.qmsum import read_qmsum


def test_book_parts_split_strip_and_skip_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "_READ_CHUNK", 7)  # separators fall across chunk edges
    part = tmp_path / "train_07.txt.xz"
    part.write_bytes(lzma.compress(b"  First book.\n\x1e\n \x1eSecond book, longer text.\x1eThird.  "))
    skipped = Counter()
    docs = list(read_book_parts([part], skipped=skipped))
    assert [d.text for d in docs] == ["First book.", "Second book, longer text.", "Third."]
    assert [d.doc_id for d in docs] == ["train_07/0000", "train_07/0001", "train_07/0002"]
    assert {d.domain for d in docs} == {"books"}
    assert skipped == Counter({"books:empty": 1})


def test_undecodable_bytes_are_replaced_with_warning(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good start \xff\xfe bad bytes, good end")
    with caplog.at_level(logging.WARNING):
        (doc,) = read_text_documents([path])
    assert doc.text == "good start \ufffd\ufffd bad bytes, good end"
    assert "invalid UTF-8" in caplog.text and "bad.txt" in caplog.text


def test_empty_text_file_is_skipped_and_counted(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "full.txt").write_text("words here")
    skipped = Counter()
    docs = list(read_text_documents([tmp_path], domain="fiction", skipped=skipped))
    assert [(d.doc_id, d.domain) for d in docs] == [("full", "fiction")]
    assert skipped == Counter({"fiction:empty": 1})


def test_missing_path_fails_at_call_time(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_text_documents([tmp_path / "nope.txt"])  # no next(): the check is eager
    with pytest.raises(FileNotFoundError, match="no .json"):
        read_qmsum([tmp_path])


def test_code_reader_skips_tests_and_orders_files(corpus):
    docs = list(read_python_sources(corpus["code"]))
    assert [d.doc_id for d in docs] == ["lib/top.py", "lib/pkg/mod.py"]  # files of a dir, then its subdirs
    assert {d.domain for d in docs} == {"code"}
    assert docs[1].text.startswith("def f(x):")


def test_code_reader_defaults_to_stdlib():
    first = next(read_python_sources())
    assert first.domain == "code" and first.doc_id.endswith(".py")
    assert "/test/" not in first.doc_id and "site-packages" not in first.doc_id


def test_qmsum_text_turn_chars_and_queries(corpus):
    docs = list(read_qmsum(corpus["qmsum"]))
    assert [d.doc_id for d in docs] == ["qmsum/val/Meet000", "qmsum/val/Meet001", "qmsum/val/Meet002"]
    doc = docs[0]
    raw = json.loads((corpus["qmsum"][0] / "val" / "Meet000.json").read_text())
    turns = raw["meeting_transcripts"]
    starts = doc.meta["turn_chars"]
    assert len(starts) == len(turns) and starts[0] == 0
    for t, turn in enumerate(turns):
        end = starts[t + 1] if t + 1 < len(starts) else len(doc.text)
        assert doc.text[starts[t]:end].rstrip("\n") == f"{turn['speaker']}: {turn['content']}"
    assert doc.meta["queries"]["specific"][0]["relevant_text_span"] == [[1, 2], [5, 5]]
    assert doc.meta["queries"]["general"][0]["query"] == "Summarize the whole meeting"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"meeting_transcripts": []}),
                                     json.dumps({"meeting_transcripts": [{"speaker": "A", "content": "x"}],
                                                 "specific_query_list": [{"relevant_text_span": [["0", "9"]]}]})])
def test_malformed_qmsum_is_skipped_with_warning(tmp_path, caplog, content):
    (tmp_path / "bad.json").write_text(content)
    skipped = Counter()
    with caplog.at_level(logging.WARNING):
        assert list(read_qmsum([tmp_path], skipped=skipped)) == []
    assert skipped == Counter({"dialogue:malformed": 1})
    assert "bad.json" in caplog.text
