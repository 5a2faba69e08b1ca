"""Training histories where far context matters, for LensNet labels with signal (focus v2).

Plain book continuations rarely need one particular far block, so counterfactual labels on them are
mostly noise (RMS ~0.01 nats, held-out Spearman ~0.05). Every history built here ends with a *question*
whose answer sits far back, at a known place (``evidence``: token ranges):

- ``repeat``: a passage (64-128 tokens of another book) is planted early in a book; the history ends with
  the passage's first ``c`` tokens again (the cue) and the answer is its continuation.
- ``fact``: ``facts`` statements "<Name>'s <thing> is <value>." are planted at random places; the history
  ends with a question about one of them and the answer is its value.
- ``qmsum``: a QMSum meeting transcript (training split only) ends with one of its specific queries; the
  answer is the reference answer, the evidence the query's ``relevant_text_span`` turns.

Each item has ``phrasings`` *variants* — different question templates (fact, qmsum) or cue lengths
(repeat) — that share the history and differ only inside the last ``query_len`` tokens, which every tiling
keeps raw (``recent_raw >= query_len``). Labels are the counterfactual utilities averaged over the variants,
so what a label rewards is the evidence, not one phrasing's quirks.

Phrasings are disjoint from the benchmark probes' (``megacontext.bench.tasks``: "The pass key is ...",
"Query: ... Answer:", unprompted verbatim repeats of the document's own text): the templates below use
other words, planted passages come from other books, and QMSum items use the training split only.

A history is block-aligned: ``t`` (the token where the answer starts) is a multiple of 32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK

KINDS = ("repeat", "fact", "qmsum")
NAMES = ("Orla", "Benedek", "Ysolde", "Tamsin", "Quillon", "Marisol", "Eero", "Zofia", "Hadrian", "Noor",
         "Ignatius", "Petra", "Lucan", "Saoirse", "Tobiah", "Wrenna", "Casimir", "Idony", "Rafferty", "Junia")
THINGS = ("locker number", "favourite river", "cousin's village", "boat's name", "door code", "lucky stone",
          "first teacher", "winter coat colour", "secret recipe spice", "train platform")
VALUES = ("Amberly", "Kestrel", "Dunmore", "Velvet", "Orchid", "Brightwater", "Copperfield", "Saffron",
          "Halloway", "Marigold", "Thistle", "Ravensworth", "Juniper", "Cobalt", "Windmere", "Lantern")
FACT_STATEMENT = " {name}'s {thing} is {value}. "
FACT_QUESTIONS = ("\nQ: what is {name}'s {thing}? A:", "\nAs noted before, {name}'s {thing} is",
                  "\nRecall the {thing} of {name}: it is")
QMSUM_QUESTIONS = ("\nQuestion about the meeting: {q}\nResponse:", "\nAbout this discussion, {q}\nReply:")


@dataclass
class FarConfig(Config):
    min_history: int = 4096  # tokens before the answer (rounded to blocks)
    max_history: int = 16384
    query_len: int = 48  # the last tokens of a history where the variants differ (<= LabelConfig.recent_raw)
    horizon: int = 24  # answer tokens scored
    facts: int = 3  # statements planted per fact history
    phrasings: int = 2  # variants per item whose utilities are averaged
    far: float = 0.15  # evidence ends at least this fraction of the history before the question
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self):
        check(BLOCK <= self.min_history <= self.max_history,
              f"min_history={self.min_history}, max_history={self.max_history}: need {BLOCK} <= min <= max")
        check(8 <= self.query_len <= self.min_history // 4, f"query_len={self.query_len} must lie in 8..min_history/4")
        check(self.horizon >= 1 and self.facts >= 1 and self.phrasings >= 1,
              f"horizon={self.horizon}, facts={self.facts}, phrasings={self.phrasings} must be >= 1")
        check(0 <= self.far < 1, f"far={self.far} must lie in [0, 1)")
        check(len(self.kinds) >= 1 and set(self.kinds) <= set(KINDS),
              f"kinds={self.kinds}; expected a subset of {KINDS}")


@dataclass
class FarItem:
    kind: str
    source: str  # which book / meeting it came from (held-out splits go by source)
    body: Tensor  # int64 [t]: the history shared by every variant (its last query_len tokens get overwritten)
    variants: list[tuple[Tensor, Tensor]]  # (question ids [<= query_len], answer ids [<= horizon]) per phrasing
    evidence: list[tuple[int, int]]

    @property
    def t(self) -> int:
        return int(self.body.shape[0])

    def ids(self, v: int) -> Tensor:
        """History + variant ``v``'s question (ending at ``t``) + its answer: int64 [t + h]."""
        q, a = self.variants[v]
        return torch.cat([self.body[: self.t - q.shape[0]], q, a])


def _ids(encode: Callable[[str], list[int]], text: str) -> Tensor:
    return torch.tensor(encode(text), dtype=torch.long)


def _length(cfg: FarConfig, g: torch.Generator, cap: int) -> int:
    lo, hi = cfg.min_history // BLOCK, min(cfg.max_history, cap) // BLOCK
    return int(torch.randint(lo, max(hi, lo) + 1, (1,), generator=g)) * BLOCK


def _window(book: Tensor, n: int, g: torch.Generator) -> Tensor:
    o = int(torch.randint(0, max(book.shape[0] - n, 0) + 1, (1,), generator=g))
    return book[o:o + n]


def repeat_item(books: Sequence[Tensor], b: int, cfg: FarConfig, g: torch.Generator) -> FarItem | None:
    t = _length(cfg, g, books[b].shape[0] - cfg.horizon - 128)
    if t < cfg.min_history:
        return None
    body = _window(books[b], t, g).clone()
    other = books[(b + 1 + int(torch.randint(len(books) - 1, (1,), generator=g))) % len(books)]
    n = int(torch.randint(64, 129, (1,), generator=g))
    passage = _window(other, n + cfg.horizon, g)
    if passage.shape[0] < n:
        return None
    latest = int((1 - cfg.far) * (t - cfg.query_len)) - n
    p = int(torch.randint(0, max(latest, 1), (1,), generator=g))
    body[p:p + n] = passage[:n]
    cues = [min(16 + 8 * k, cfg.query_len, n - 8) for k in range(cfg.phrasings)]
    variants = [(passage[:c], passage[c:c + cfg.horizon]) for c in cues]
    return FarItem("repeat", f"book{b}", body, variants, [(p, p + n)])


def fact_item(books: Sequence[Tensor], b: int, encode, cfg: FarConfig, g: torch.Generator) -> FarItem | None:
    t = _length(cfg, g, books[b].shape[0])
    if t < cfg.min_history:
        return None
    pick = lambda pool: pool[int(torch.randint(len(pool), (1,), generator=g))]  # noqa: E731
    names = torch.randperm(len(NAMES), generator=g)[: cfg.facts].tolist()
    facts = [(NAMES[i], pick(THINGS), pick(VALUES)) for i in names]
    body = _window(books[b], t, g).clone()
    latest = int((1 - cfg.far) * (t - cfg.query_len))
    spots = torch.randint(0, max(latest - 64, 1), (cfg.facts,), generator=g).sort().values.tolist()
    spans = []
    for (name, thing, value), p in zip(facts, spots, strict=True):
        s = _ids(encode, FACT_STATEMENT.format(name=name, thing=thing, value=value))
        body[p:p + s.shape[0]] = s[: t - p]
        spans.append((p, p + s.shape[0]))
    k = int(torch.randint(cfg.facts, (1,), generator=g))
    name, thing, value = facts[k]
    answer = _ids(encode, f" {value}.")[: cfg.horizon]
    order = torch.randperm(len(FACT_QUESTIONS), generator=g).tolist()[: cfg.phrasings]
    variants = [(_ids(encode, FACT_QUESTIONS[i].format(name=name, thing=thing))[-cfg.query_len:], answer)
                for i in order]
    return FarItem("fact", f"book{b}", body, variants, [spans[k]])


def qmsum_item(meeting: dict, encode, cfg: FarConfig, g: torch.Generator) -> FarItem | None:
    """``meeting``: {"id", "ids" int64 [N], "queries": [{"query", "answer", "spans": [(a, b) tokens]}]}."""
    qs = [q for q in meeting["queries"] if q["spans"]]
    if not qs:
        return None
    q = qs[int(torch.randint(len(qs), (1,), generator=g))]
    ids = meeting["ids"]
    t = min(ids.shape[0], cfg.max_history) // BLOCK * BLOCK
    if t < cfg.min_history:
        return None
    cut = ids.shape[0] - t  # keep the end of the meeting: the question follows it
    latest = int((1 - cfg.far) * (t - cfg.query_len))
    spans = [(max(a - cut, 0), b - cut) for a, b in q["spans"] if b - cut > 0 and a - cut < latest]
    if not spans:
        return None
    answer = _ids(encode, " " + q["answer"].strip())[: cfg.horizon]
    order = torch.randperm(len(QMSUM_QUESTIONS), generator=g).tolist()[: cfg.phrasings]
    variants = [(_ids(encode, QMSUM_QUESTIONS[i].format(q=q["query"].strip()))[-cfg.query_len:], answer)
                for i in order]
    return FarItem("qmsum", f"meeting{meeting['id']}", ids[cut:].clone(), variants, spans)


def make_items(n: int, books: Sequence[Tensor], meetings: Sequence[dict], encode, cfg: FarConfig, seed: int
               ) -> list[FarItem]:
    """``n`` items cycling through ``cfg.kinds`` (kinds without data are skipped), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    kinds = [k for k in cfg.kinds if (meetings if k == "qmsum" else len(books) >= 2)]
    if not kinds:
        raise ValueError("no data for any kind: need >= 2 books (repeat, fact) or QMSum meetings (qmsum)")
    out: list[FarItem] = []
    tries = 0
    while len(out) < n and tries < 20 * n:
        kind = kinds[tries % len(kinds)]
        tries += 1
        if kind == "qmsum":
            item = qmsum_item(meetings[int(torch.randint(len(meetings), (1,), generator=g))], encode, cfg, g)
        else:
            b = int(torch.randint(len(books), (1,), generator=g))
            item = repeat_item(books, b, cfg, g) if kind == "repeat" else fact_item(books, b, encode, cfg, g)
        if item is not None:
            out.append(item)
    return out
