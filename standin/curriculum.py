"""Training rows for the stand-in base v2: plain text plus rows where reading the whole window pays.

Row types (shares of each batch set by ``Mix``; rows are ``seq + 1`` tokens, inputs ``[:-1]``, targets ``[1:]``):
- ``book`` / ``code``: a random window of the source, unchanged.
- ``copy``: a window with 1-3 planted copies: span ``[a, a+n)`` is repeated at ``a + D``. The DISTANCE ``D`` is
  drawn uniformly in ``copy_dist`` (32..2016 by default: the whole window), then the length ``n``
  log-uniformly in ``[8, min(256, D, L - D)]`` (so far copies are as frequent as near ones; at D near
  the window's end only short spans fit). Placement is vectorised over rows.
- ``passkey``: a key (4-7 digits, mostly 5) stated once in a TRAIN wording, asked for later; the gap between
  statement and question is uniform over the filler, and the row goes on after the answer.
- ``fact``: 2-8 facts of the TRAIN grammar (standin.grammar) stated once, 2-6 of them asked for later in a
  different surface frame; statements and questions interleave (a question always after its statement).
Filler of copy/passkey/fact rows is book text with probability ``book_filler``, else code (passkey rows
also use the classic repeated filler sentences with probability ``repeat_filler``).

Positions: a ``pose_frac`` share of all rows carries one PoSE skip of ``0..pose_max`` positions at a cut;
for rows with planted content the cut falls, half of the time, between the planted source and its
recall, so copies, keys and facts are read across a skip.

Masks over targets (``[B, seq]``): ``recall`` marks tokens predictable only by reading the window (copied
tokens after the first of each copy whose source is intact; key and fact answers); ``natural_book`` marks
unplanted tokens of book text (the tokens a teacher may regularise). Rows are ordered book-text rows
first (``n_book_rows``), so a teacher runs on one contiguous slice.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from standin import grammar

ROW_TYPES = ("book", "code", "copy", "passkey", "fact")
BOOK, CODE, COPY, PASSKEY, FACT = range(5)


@dataclass
class Mix:
    """Row shares and curriculum knobs (validated; see module docstring)."""

    book: float = 0.20
    code: float = 0.15
    copy: float = 0.25
    passkey: float = 0.10
    fact: float = 0.30
    book_filler: float = 0.5
    repeat_filler: float = 0.2
    pose_frac: float = 1 / 3
    pose_max: int = 65536 - 2048
    copy_dist: tuple[int, int] = (32, 2016)
    copy_len: tuple[int, int] = (8, 256)
    copies: tuple[int, int] = (1, 3)
    facts: tuple[int, int] = (2, 8)
    questions: tuple[int, int] = (2, 6)

    def __post_init__(self):
        shares = [self.book, self.code, self.copy, self.passkey, self.fact]
        if any(s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(f"row shares must be >= 0 with a positive sum, got {shares}")
        for name in ("book_filler", "repeat_filler", "pose_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        for name in ("copy_dist", "copy_len", "copies", "facts", "questions"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}={getattr(self, name)} must satisfy 1 <= lo <= hi")
        if self.questions[1] > self.facts[0] and self.questions[0] > self.facts[0]:
            raise ValueError(f"questions={self.questions} cannot exceed the fewest facts {self.facts[0]}")

    def counts(self, batch: int) -> np.ndarray:
        """Rows of each type in a batch of ``batch`` rows (largest remainder; deterministic)."""
        w = np.array([self.book, self.code, self.copy, self.passkey, self.fact], dtype=np.float64)
        exact = w / w.sum() * batch
        n = np.floor(exact).astype(np.int64)
        for i in np.argsort(-(exact - n), kind="stable")[: batch - n.sum()]:
            n[i] += 1
        return n


@dataclass
class Batch:
    ids: np.ndarray  # [B, L] int64, L = seq + 1
    pos: np.ndarray  # [B, seq] int64 position ids of the inputs
    row_type: np.ndarray  # [B] int64 (ROW_TYPES index)
    recall: np.ndarray  # [B, seq] bool, over targets
    natural_book: np.ndarray  # [B, seq] bool, over targets
    n_book_rows: int  # rows [0, n_book_rows) hold book text
    tokens: dict = field(default_factory=dict)  # natural tokens drawn per source (pass accounting)
    copy_dist: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # distances planted


class BatchBuilder:
    """Builds ``Batch``es from token sources with a seeded RNG (same seed and start -> same batches)."""

    def __init__(self, books: np.ndarray, code: np.ndarray, tokenizer, seq: int = 2048, batch: int = 64,
                 mix: Mix | None = None, seed: int = 0, start_step: int = 0, grammar_: grammar.Grammar = grammar.TRAIN):
        self.mix = mix or Mix()
        self.seq, self.batch, self.L = seq, batch, seq + 1
        self.books, self.code = books, code
        for name, src in (("books", books), ("code", code)):
            if src.size <= self.L + 1:
                raise ValueError(f"{name} source has {src.size} tokens, need more than one row ({self.L + 1})")
        self.tok = tokenizer
        self.g = grammar_
        self.rng = np.random.default_rng([seed, start_step])
        self.prng = random.Random(f"{seed}:{start_step}")
        self.counts = self.mix.counts(batch)
        self.repeat_ids = np.asarray(self._enc([grammar.REPEAT_FILLER * 4])[0], dtype=np.int64)
        lo, hi = self.mix.copy_dist  # clipped to the window (tests use short ones)
        self.copy_dist = (min(lo, max(1, self.L // 4)), min(hi, self.L - 9))

    # ------------------------------------------------------------------ helpers
    def _enc(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _windows(self, src: np.ndarray, n: int, length: int) -> np.ndarray:
        """[n, length] int64 random windows of ``src``."""
        if n == 0:
            return np.zeros((0, length), dtype=np.int64)
        starts = self.rng.integers(0, src.size - length, size=n)
        return src[starts[:, None] + np.arange(length)[None]].astype(np.int64)

    # ------------------------------------------------------------------ copies (vectorised over rows)
    def plant_copies(self, x: np.ndarray):
        """Plant copies in rows ``x`` [n, L]. Returns (rows, recall mask [n, L], copied-token mask [n, L],
        (lo, hi) crossing range [n, 2] of each row's first copy, distances [m] of all planted copies)."""
        n, L = x.shape
        t = np.arange(L)[None]
        idx = np.broadcast_to(t, (n, L)).copy()
        k = self.rng.integers(self.mix.copies[0], self.mix.copies[1] + 1, size=n)
        cross = np.full((n, 2), -1, dtype=np.int64)
        dists = []
        dlo, dhi = self.copy_dist
        lmin, lmax = self.mix.copy_len
        for j in range(int(k.max(initial=0))):
            rows = np.nonzero(k > j)[0]
            d = self.rng.integers(dlo, dhi + 1, size=rows.size)
            nmax = np.minimum(np.minimum(lmax, d), L - d).clip(min=1)
            nmin = np.minimum(lmin, nmax)
            u = self.rng.random(rows.size)
            ln = np.floor(np.exp(np.log(nmin) + u * (np.log(nmax + 1) - np.log(nmin)))).astype(np.int64)
            ln = np.clip(ln, nmin, nmax)
            a = (self.rng.random(rows.size) * (L - d - ln + 1)).astype(np.int64)
            b = a + d
            inside = (t >= b[:, None]) & (t < (b + ln)[:, None])  # [r, L]
            src = np.where(inside, t - d[:, None], t)
            idx[rows] = np.take_along_axis(idx[rows], src, axis=1)
            if j == 0:
                cross[rows, 0], cross[rows, 1] = a + ln, b
            dists.append(d)
        out = np.take_along_axis(x, idx, axis=1)
        intact = np.take_along_axis(idx, idx, axis=1) == idx  # the copied-from position still holds its token
        chained = np.zeros_like(intact)
        chained[:, 1:] = idx[:, 1:] == idx[:, :-1] + 1  # previous token copied from the previous source token
        recall = (idx != t) & intact & chained
        return out, recall, idx != t, cross, (np.concatenate(dists) if dists else np.zeros(0, np.int64))

    # ------------------------------------------------------------------ spliced rows (facts, pass keys)
    def _filler(self, kind: str, length: int) -> np.ndarray:
        if kind == "repeat":
            reps = -(-(length + self.repeat_ids.size) // self.repeat_ids.size)
            tiled = np.tile(self.repeat_ids, reps)
            off = int(self.rng.integers(0, self.repeat_ids.size))
            return tiled[off:off + length]
        src = self.books if kind == "books" else self.code
        return self._windows(src, 1, length)[0]

    def _splice(self, filler: np.ndarray, items: list[list[np.ndarray]], offsets: list[int],
                answer_of: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Insert item pieces into ``filler`` at (sorted) filler offsets. ``answer_of[i]`` names the piece of
        item i that is an answer (-1 none). Returns (row, recall mask, inserted-token mask, item starts)."""
        parts, rec, ins, starts, prev, at = [], [], [], [], 0, 0
        for pieces, off, ans in zip(items, offsets, answer_of, strict=True):
            parts.append(filler[prev:off])
            rec.append(np.zeros(off - prev, dtype=bool))
            ins.append(np.zeros(off - prev, dtype=bool))
            at += off - prev
            starts.append(at)
            for p_i, piece in enumerate(pieces):
                parts.append(piece)
                rec.append(np.full(piece.size, p_i == ans, dtype=bool))
                ins.append(np.ones(piece.size, dtype=bool))
                at += piece.size
            prev = off
        parts.append(filler[prev:])
        rec.append(np.zeros(filler.size - prev, dtype=bool))
        ins.append(np.zeros(filler.size - prev, dtype=bool))
        return np.concatenate(parts), np.concatenate(rec), np.concatenate(ins), starts

    def _planned_texts(self, n_fact: int, n_key: int):
        """Texts of this batch's fact and pass-key rows (encoded together in one call)."""
        r = self.prng
        plans, texts = [], []
        for _ in range(n_fact):
            k = r.randint(*self.mix.facts)
            facts = self.g.facts(k, r)
            order = []  # (kind, fact index): statements shuffled, each question after its statement
            stmts = list(range(k))
            r.shuffle(stmts)
            order = [("s", i) for i in stmts]
            frames = {}
            for i in stmts:
                frame, text = self.g.statement(facts[i], r)
                frames[i] = frame
                # a value that opens the sentence keeps its leading space (its tokens must match the answer's)
                texts.append((" " if frame.startswith("{V}") else r.choice((" ", "\n", "\n\n"))) + text)
            asked = r.sample(range(k), min(k, r.randint(*self.mix.questions)))
            for i in asked:
                after = order.index(("s", i))
                order.insert(r.randint(after + 1, len(order)), ("q", i))
                texts += [r.choice((" ", "\n")) + self.g.question(facts[i], frames[i], r), " " + facts[i][2],
                          r.choice((".", ".\n"))]
            plans.append(("fact", stmts, asked, order))
        for _ in range(n_key):
            digits = 5 if r.random() < 0.6 else r.randint(4, 7)
            key = str(r.randrange(10 ** (digits - 1), 10 ** digits))
            st, q = self.g.passkey(key, r)
            sep = " " if st.startswith(key) else r.choice((" ", "\n"))  # the key keeps its leading space
            texts += [sep + st, r.choice((" ", "\n")) + q, " " + key, r.choice((".", ".\n"))]
            plans.append(("key", None, None, None))
        return plans, texts

    def spliced_rows(self, n_fact: int, n_key: int, filler_kinds: list[str]):
        """Fact rows then pass-key rows: ids [n, L], recall [n, L], inserted [n, L], cross [n, 2], filler
        lengths [n]."""
        plans, texts = self._planned_texts(n_fact, n_key)
        enc = [np.asarray(e, dtype=np.int64) for e in self._enc(texts)] if texts else []
        L, cur, n = self.L, 0, n_fact + n_key
        ids, recall, inserted = np.zeros((n, L), np.int64), np.zeros((n, L), bool), np.zeros((n, L), bool)
        cross, fill = np.full((n, 2), -1, dtype=np.int64), np.zeros(n, np.int64)
        for r_i, (kind, stmts, asked, order) in enumerate(plans):
            if kind == "fact":
                pieces = {("s", i): [enc[cur + j]] for j, i in enumerate(stmts)}
                cur += len(stmts)
                for i in asked:
                    pieces[("q", i)] = enc[cur:cur + 3]
                    cur += 3
                while sum(p.size for o in order for p in pieces[o]) > L // 2 and len(order) > 2:
                    # too long for this window: drop the last item no kept question depends on
                    drop = next(j for j in range(len(order) - 1, -1, -1)
                                if order[j][0] == "q" or ("q", order[j][1]) not in order)
                    del order[drop]
                items = [pieces[o] for o in order]
                answer_of = [-1 if kd == "s" else 1 for kd, _ in order]
                fill_len = L - sum(p.size for it in items for p in it)
                offsets = sorted(self.rng.integers(0, fill_len + 1, size=len(items)).tolist())
            else:
                st, q, a, tail = enc[cur:cur + 4]
                cur += 4
                items, answer_of = [[st], [q, a, tail]], [-1, 1]
                fill_len = L - st.size - q.size - a.size - tail.size
                gap = int(self.rng.integers(0, max(fill_len - 16, 1)))
                first = int(self.rng.integers(0, fill_len - gap + 1))
                offsets = [first, first + gap]
            row, rec, ins, starts = self._splice(self._filler(filler_kinds[r_i], fill_len), items, offsets,
                                                 answer_of)
            ids[r_i], recall[r_i], inserted[r_i], fill[r_i] = row, rec, ins, fill_len
            ends = [s + sum(p.size for p in it) for s, it in zip(starts, items, strict=True)]
            if len(items) > 1 and starts[-1] > ends[0]:
                cross[r_i] = (ends[0], starts[-1])
        return ids, recall, inserted, cross, fill

    # ------------------------------------------------------------------ positions
    def positions(self, cross: np.ndarray) -> np.ndarray:
        """[B, seq] position ids with PoSE skips; ``cross`` [B, 2] is a preferred cut range per row (-1: none)."""
        B, T = cross.shape[0], self.seq
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
        skip_rows = self.rng.random(B) < self.mix.pose_frac
        cut = self.rng.integers(1, T, size=B)
        lo, hi = cross[:, 0].clip(1, T - 1), cross[:, 1].clip(1, T - 1)
        prefer = (cross[:, 0] >= 0) & (hi > lo) & (self.rng.random(B) < 0.5)
        cut = np.where(prefer, lo + (self.rng.random(B) * (hi - lo)).astype(np.int64), cut)
        skip = self.rng.integers(0, self.mix.pose_max + 1, size=B)
        pos += np.where(skip_rows[:, None] & (np.arange(T)[None] >= cut[:, None]), skip[:, None], 0)
        return pos

    # ------------------------------------------------------------------ the batch
    def next_batch(self) -> Batch:
        n_book, n_code, n_copy, n_key, n_fact = (int(c) for c in self.counts)
        L, mix = self.L, self.mix
        # filler sources in fixed counts per batch, so every batch has the same composition (static shapes
        # for the teacher slice, exact pass accounting)
        copy_books = np.arange(n_copy) < round(n_copy * mix.book_filler)
        kinds = np.array(["code"] * (n_fact + n_key), dtype=object)
        kinds[:round(n_fact * mix.book_filler)] = "books"
        n_rep = round(n_key * mix.repeat_filler)
        n_kb = min(n_key - n_rep, round(n_key * mix.book_filler))
        kinds[n_fact:n_fact + n_kb] = "books"
        kinds[n_fact + n_key - n_rep:] = "repeat"
        # copies: windows from books or code, then planted (vectorised)
        cx = np.empty((n_copy, L), dtype=np.int64)
        cx[copy_books] = self._windows(self.books, int(copy_books.sum()), L)
        cx[~copy_books] = self._windows(self.code, int((~copy_books).sum()), L)
        cx, c_rec, c_ins, c_cross, dists = self.plant_copies(cx)
        sx, s_rec, s_ins, s_cross, s_fill = self.spliced_rows(n_fact, n_key, list(kinds))
        plain_b, plain_c = self._windows(self.books, n_book, L), self._windows(self.code, n_code, L)
        none = lambda n: np.zeros((n, L), bool)  # noqa: E731
        blocks = [  # (ids, recall, inserted, cross, type, book text?)
            (plain_b, none(n_book), none(n_book), np.full((n_book, 2), -1), np.full(n_book, BOOK),
             np.ones(n_book, bool)),
            (cx, c_rec, c_ins, c_cross, np.full(n_copy, COPY), copy_books),
            (sx, s_rec, s_ins, s_cross, np.array([FACT] * n_fact + [PASSKEY] * n_key, dtype=np.int64),
             kinds == "books"),
            (plain_c, none(n_code), none(n_code), np.full((n_code, 2), -1), np.full(n_code, CODE),
             np.zeros(n_code, bool)),
        ]
        ids, recall, inserted, cross, rtype, is_book = (np.concatenate([b[i] for b in blocks]) for i in range(6))
        order = np.argsort(~is_book.astype(bool), kind="stable")  # book-text rows first (teacher slice)
        ids, recall, inserted = ids[order], recall[order], inserted[order]
        cross, rtype = cross[order].astype(np.int64), rtype[order].astype(np.int64)
        is_book = is_book[order].astype(bool)
        natural_book = is_book[:, None] & ~inserted
        tokens = {  # tokens drawn from each source (filler included), for the pass count
            "books": int(L * (n_book + copy_books.sum()) + s_fill[kinds == "books"].sum()),
            "code": int(L * (n_code + (~copy_books).sum()) + s_fill[kinds == "code"].sum()),
        }
        return Batch(ids=ids, pos=self.positions(cross), row_type=rtype, recall=recall[:, 1:],
                     natural_book=natural_book[:, 1:], n_book_rows=int(is_book.sum()), tokens=tokens,
                     copy_dist=dists)


class Prefetcher:
    """Builds batches on a background thread into a small queue of (pinned) torch tensors."""

    def __init__(self, builder: BatchBuilder, depth: int = 4, pin: bool = False):
        self.builder, self.pin = builder, pin
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="batch-prefetch")
        self.thread.start()

    def _run(self):
        try:
            while not self.stop.is_set():
                b = self.builder.next_batch()
                t = {k: torch.from_numpy(np.ascontiguousarray(getattr(b, k)))
                     for k in ("ids", "pos", "row_type", "recall", "natural_book")}
                if self.pin:
                    t = {k: v.pin_memory() for k, v in t.items()}
                item = (t, b)
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer
            self.error = e
            self.q.put(None)

    def get(self):
        item = self.q.get()
        if item is None:
            raise RuntimeError("batch prefetch thread failed") from self.error
        return item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
