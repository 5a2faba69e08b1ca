"""QMSum meeting transcripts as dialogue documents with a turn map and the benchmark's queries.

Text layout: one line per turn, ``"<speaker>: <content>"``, lines joined by ``"\\n"``. ``meta["turn_chars"]``
holds the character offset where each turn starts (strictly increasing, first is 0); turn ``t`` owns the
characters ``[turn_chars[t], turn_chars[t+1])`` including the newline that ends it, so turns tile the text.
The token cache maps these offsets to token offsets, which is what evidence spans need: a QMSum
``relevant_text_span`` ``["a", "b"]`` is an *inclusive* range of turn indices, stored here as ints.

Queries are kept verbatim (query, answer, spans) under ``meta["queries"]`` as
``{"general": [...], "specific": [...]}``. Malformed files (invalid JSON, no transcript, non-integer spans)
are skipped with a warning and counted, following the corpus-reader policy in :mod:`megacontext.data.corpora`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from megacontext.data.corpora import Document, decode_text, existing_paths, expand_files, tally_skip

log = logging.getLogger(__name__)

TURN_SEPARATOR = "\n"


class QMSumFormatError(ValueError):
    """A QMSum json file does not have the expected structure."""


def _spans(raw, n_turns: int, where: str) -> list[list[int]]:
    out = []
    for pair in raw or []:
        try:
            a, b = (int(x) for x in pair)
        except (TypeError, ValueError) as e:
            raise QMSumFormatError(f"{where}: relevant_text_span entry {pair!r} is not a pair of integers") from e
        if not 0 <= a <= b < n_turns:
            raise QMSumFormatError(f"{where}: span {pair!r} outside turns 0..{n_turns - 1} or reversed")
        out.append([a, b])
    return out


def _queries(data: dict, n_turns: int, where: str) -> dict:
    general = [{"query": q.get("query", ""), "answer": q.get("answer", "")}
               for q in data.get("general_query_list") or []]
    specific = [{"query": q.get("query", ""), "answer": q.get("answer", ""),
                 "relevant_text_span": _spans(q.get("relevant_text_span"), n_turns, where)}
                for q in data.get("specific_query_list") or []]
    return {"general": general, "specific": specific}


def parse_meeting(data: dict, doc_id: str, where: str) -> Document:
    """Build the dialogue Document of one parsed QMSum json object (raises QMSumFormatError when malformed)."""
    turns = data.get("meeting_transcripts") if isinstance(data, dict) else None
    if not isinstance(turns, list) or not turns:
        raise QMSumFormatError(f"{where}: expected a non-empty 'meeting_transcripts' list of {{speaker, content}}")
    lines = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "content" not in turn:
            raise QMSumFormatError(f"{where}: turn {i} is {turn!r}, expected {{'speaker': ..., 'content': ...}}")
        lines.append(f"{str(turn.get('speaker', '')).strip()}: {str(turn['content']).strip()}")
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line) + len(TURN_SEPARATOR)
    meta = {"source": Path(where).name, "turn_chars": starts, "queries": _queries(data, len(lines), where)}
    return Document(doc_id, "dialogue", TURN_SEPARATOR.join(lines), meta)


def read_qmsum(paths: Iterable[str | os.PathLike], skipped: Counter | None = None) -> Iterator[Document]:
    """Meetings from QMSum json files or directories of them (searched recursively, sorted).

    Doc id is ``qmsum/<parent dir>/<stem>`` (e.g. ``qmsum/val/Bed002``), so the split folder stays visible.
    """
    roots = existing_paths(paths, "QMSum paths")
    files = expand_files(roots, ".json")
    if not files:
        raise FileNotFoundError(f"QMSum: no .json files under {[str(r) for r in roots]}")

    def gen() -> Iterator[Document]:
        for path in files:
            doc_id = f"qmsum/{path.parent.name}/{path.stem}"
            try:
                doc = parse_meeting(json.loads(decode_text(path.read_bytes(), str(path))), doc_id, str(path))
            except (json.JSONDecodeError, QMSumFormatError) as e:
                log.warning("skipping %s: %s", path, e)
                tally_skip(skipped, "dialogue", "malformed")
                continue
            yield doc

    return gen()
