"""Task generators: deterministic samples (from a seed) over prepared token documents.

Every generator is pure: token documents (and, for text-built prompts, an ``encode`` function) in,
:class:`~megacontext.bench.system.Sample` list out; nothing is downloaded or read here (see
:mod:`megacontext.bench.corpora`). The same seed and inputs give the same samples on every machine.

Tasks (ids used in configs and result files):
- ``books_ppl`` / ``code_ppl``: every token of each document (first ``max_tokens``) is a target; the harness
  reports NLL by position bucket.
- ``far_recall``: a passage of 32..256 tokens from a document is repeated ``distance`` tokens after its own
  start (the text between is the document's natural continuation); targets are the repeat minus its first
  token (which no system can know to be a repeat).
- ``passkey``: "The pass key is NNNNN. Remember it." is inserted in a book haystack; ``distance`` tokens of
  haystack later comes "The pass key is" and the targets are the key's tokens.
- ``qmsum``: meeting transcript, then "Query: ... Answer:", targets = the reference answer.

Far-recall and passkey samples record ``meta["evidence"]``: the token ranges holding what the targets need
(the original passage; the pass-key sentence), used by the evidence-oracle focus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from megacontext.bench.system import Sample

TASKS = ("books_ppl", "far_recall", "passkey", "qmsum", "code_ppl")
Encode = Callable[[str], list[int]]


@dataclass
class TokenDoc:
    doc_id: str
    tokens: Tensor  # [N] int64


@dataclass
class Meeting:
    meeting_id: str
    transcript: str
    queries: list[tuple[str, str]]  # (query, reference answer)


def _ids(x: Sequence[int]) -> Tensor:
    return torch.as_tensor(list(x), dtype=torch.long)


def perplexity_samples(docs: Sequence[TokenDoc], max_tokens: int, task: str = "books_ppl") -> list[Sample]:
    """One sample per document: its first ``max_tokens`` tokens, all but the first scored."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2")
    out = []
    for d in docs:
        toks = d.tokens[:max_tokens]
        if toks.shape[0] < 2:
            continue
        out.append(Sample(f"{task}/{d.doc_id}", toks, 1, int(toks.shape[0]), {"doc": d.doc_id}))
    return out


def _pick(docs: Sequence[TokenDoc], need: int, rng: np.random.Generator, what: str) -> tuple[TokenDoc, int]:
    """A random document with at least ``need`` tokens and a random offset leaving ``need`` tokens."""
    eligible = [d for d in docs if d.tokens.shape[0] >= need]
    if not eligible:
        longest = max((int(d.tokens.shape[0]) for d in docs), default=0)
        raise ValueError(f"{what}: no document has {need} tokens (longest has {longest}); "
                         "lower the distance or supply longer documents")
    doc = eligible[int(rng.integers(len(eligible)))]
    return doc, int(rng.integers(doc.tokens.shape[0] - need + 1))


def far_recall_samples(docs: Sequence[TokenDoc], distances: Sequence[int], per_distance: int, seed: int = 0,
                       passage_min: int = 32, passage_max: int = 256, lead: int = 256) -> list[Sample]:
    if not 2 <= passage_min <= passage_max:
        raise ValueError(f"passage lengths {passage_min}..{passage_max} must satisfy 2 <= min <= max")
    rng = np.random.default_rng(seed)
    out = []
    for dist in distances:
        if dist <= passage_max:
            raise ValueError(f"far_recall distance {dist} must exceed passage_max={passage_max}")
        for k in range(per_distance):
            n = int(rng.integers(passage_min, passage_max + 1))
            doc, o = _pick(docs, lead + dist, rng, f"far_recall distance {dist}")
            stream = doc.tokens[o:o + lead + dist]
            passage = stream[lead:lead + n]
            tokens = torch.cat([stream, passage])
            start = lead + dist
            out.append(Sample(f"far_recall/d{dist}/{k}", tokens, start + 1, start + n,
                              {"doc": doc.doc_id, "distance": dist, "passage_len": n, "offset": o,
                               "evidence": [(lead, lead + n)]}))
    return out


def passkey_samples(docs: Sequence[TokenDoc], encode: Encode, distances: Sequence[int], per_distance: int,
                    seed: int = 0, lead: int = 256) -> list[Sample]:
    """``distance`` = haystack tokens between the end of the key statement and the question."""
    rng = np.random.default_rng(seed)
    question = _ids(encode("\nThe pass key is"))
    out = []
    for dist in distances:
        for k in range(per_distance):
            key = int(rng.integers(10000, 100000))
            statement = _ids(encode(f" The pass key is {key}. Remember it. "))
            answer = _ids(encode(f" {key}"))
            doc, o = _pick(docs, lead + dist, rng, f"passkey distance {dist}")
            hay = doc.tokens[o:o + lead + dist]
            tokens = torch.cat([hay[:lead], statement, hay[lead:], question, answer])
            end = int(tokens.shape[0])
            out.append(Sample(f"passkey/d{dist}/{k}", tokens, end - answer.shape[0], end,
                              {"doc": doc.doc_id, "distance": dist, "key": key,
                               "evidence": [(lead, lead + int(statement.shape[0]))]}))
    return out


def qmsum_samples(meetings: Sequence[Meeting], encode: Encode, max_queries_per_meeting: int | None = None,
                  max_answer_tokens: int = 512) -> list[Sample]:
    out = []
    for m in meetings:
        transcript = _ids(encode(m.transcript))
        for q, (query, answer) in enumerate(m.queries[:max_queries_per_meeting]):
            prompt = _ids(encode(f"\n\nQuery: {query.strip()}\nAnswer:"))
            if not answer.strip():
                continue
            target = _ids(encode(" " + answer.strip()))[:max_answer_tokens]
            tokens = torch.cat([transcript, prompt, target])
            end = int(tokens.shape[0])
            out.append(Sample(f"qmsum/{m.meeting_id}/{q}", tokens, end - target.shape[0], end,
                              {"doc": m.meeting_id, "history_tokens": int(transcript.shape[0])}))
    return out
