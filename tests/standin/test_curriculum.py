"""Training rows: shapes, composition, uniform copy distances, intact recall targets, PoSE, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from standin.curriculum import BOOK, CODE, COPY, FACT, PASSKEY, BatchBuilder, Mix, Prefetcher


@pytest.fixture(scope="module")
def builder(token_streams, tokenizer):
    books, code = token_streams
    return BatchBuilder(books, code, tokenizer, seq=2048, batch=64, seed=0)


def test_batch_shapes_types_and_composition(builder):
    b = builder.next_batch()
    assert b.ids.shape == (64, 2049) and b.ids.dtype == np.int64
    assert b.pos.shape == (64, 2048) and b.pos.dtype == np.int64
    assert b.recall.shape == b.natural_book.shape == (64, 2048) and b.recall.dtype == bool
    assert b.ids.min() >= 0 and b.ids.max() < 16384
    counts = Mix().counts(64)
    assert [int((b.row_type == t).sum()) for t in (BOOK, CODE, COPY, PASSKEY, FACT)] == counts.tolist()
    # book-text rows come first (the teacher's slice) and hold every natural book token
    assert (b.row_type[: b.n_book_rows] != CODE).all() and (b.row_type[b.n_book_rows:] != BOOK).all()
    assert not b.natural_book[b.n_book_rows:].any() and b.natural_book[: b.n_book_rows].mean() > 0.8
    # every recall row type carries recall targets; plain rows none
    for t in (COPY, PASSKEY, FACT):
        assert b.recall[b.row_type == t].any(axis=1).all()
    assert not b.recall[(b.row_type == BOOK) | (b.row_type == CODE)].any()
    assert b.tokens["books"] > 0 and b.tokens["code"] > 0


def test_copy_distances_are_uniform_over_the_window(token_streams, tokenizer):
    books, code = token_streams
    b = BatchBuilder(books, code, tokenizer, seq=2048, batch=64, seed=11)
    x = np.tile(np.arange(b.L), (5000, 1))
    _, _, _, _, dist = b.plant_copies(x)
    lo, hi = b.copy_dist
    assert (lo, hi) == (32, 2016) and dist.min() >= lo and dist.max() <= hi
    hist, _ = np.histogram(dist, bins=8, range=(lo, hi + 1))
    expected = dist.size / 8  # ~1250 per bin: 3 standard deviations are ~8%
    assert np.all(np.abs(hist - expected) < 0.08 * expected), hist  # far copies as frequent as near ones
    assert (dist >= 1900).mean() > 0.05


def test_planted_copies_are_exact_and_recall_marks_only_copied_tokens(builder):
    L = builder.L
    x = np.tile(np.arange(L), (500, 1))  # unique tokens: a copied token names its source position
    out, recall, copied, _, _ = builder.plant_copies(x)
    t = np.arange(L)
    assert (copied == (out != t)).all()
    r, c = np.nonzero(recall)
    src = out[r, c]
    assert (src < c).all()  # copied from earlier
    assert (out[r, src] == src).all()  # the source still holds its token: the copy is readable
    assert (out[r, c - 1] == src - 1).all()  # and the previous token was copied too (first copied token excluded)
    assert recall.sum() > 0.5 * copied.sum()


def test_pose_positions(builder):
    pos = np.concatenate([builder.next_batch().pos for _ in range(6)])
    d = np.diff(pos, axis=1)
    assert (d >= 1).all() and pos.max() < 65536 and (pos[:, 0] == 0).all()
    skipped = (d > 1).sum(1)
    assert skipped.max() == 1
    assert 0.2 < (skipped == 1).mean() < 0.45  # about a third of the rows


def test_spliced_rows_state_before_they_ask(builder, tokenizer):
    for _ in range(4):
        _check_answers_stated(builder.next_batch(), tokenizer)


def _check_answers_stated(b, tokenizer):
    for r in np.nonzero((b.row_type == FACT) | (b.row_type == PASSKEY))[0]:
        ans = np.nonzero(b.recall[r])[0] + 1  # target index t predicts ids[t + 1]
        runs = np.split(ans, np.nonzero(np.diff(ans) > 1)[0] + 1)
        for run in runs:
            val = b.ids[r, run]
            before = b.ids[r, : run[0]]
            hits = [i for i in range(len(before) - len(val) + 1) if (before[i:i + len(val)] == val).all()]
            assert hits, tokenizer.decode(val)  # the answer was stated earlier in the row


def test_same_seed_same_batches_and_start_step_changes_them(token_streams, tokenizer):
    books, code = token_streams
    mk = lambda start: BatchBuilder(books, code, tokenizer, seq=256, batch=8, seed=3, start_step=start)  # noqa: E731
    a, b, c = mk(0).next_batch(), mk(0).next_batch(), mk(5).next_batch()
    assert (a.ids == b.ids).all() and (a.pos == b.pos).all()
    assert not (a.ids == c.ids).all()


def test_prefetcher_yields_tensors(token_streams, tokenizer):
    books, code = token_streams
    pf = Prefetcher(BatchBuilder(books, code, tokenizer, seq=128, batch=8, seed=0), depth=2)
    try:
        t, b = pf.get()
        assert t["ids"].shape == (8, 129) and str(t["ids"].dtype) == "torch.int64"
        assert t["recall"].dtype == t["natural_book"].dtype == torch.bool
        assert not t["natural_book"][b.n_book_rows:].any() and (t["row_type"][: b.n_book_rows] != CODE).all()
    finally:
        pf.close()


def test_batch_building_keeps_up(builder):
    builder.next_batch()
    t = time.perf_counter()
    for _ in range(5):
        builder.next_batch()
    per = (time.perf_counter() - t) / 5
    assert per < 0.25, f"{per:.3f} s per 64x2048 batch"  # 14 ms on a 2-core CPU; GPU steps take ~0.12 s


def test_mix_validation():
    with pytest.raises(ValueError, match="pose_frac"):
        Mix(pose_frac=1.5)
    with pytest.raises(ValueError, match="copy_dist"):
        Mix(copy_dist=(0, 10))
    assert Mix().counts(64).sum() == 64 and Mix(book=1, code=0, copy=0, passkey=0, fact=0).counts(5).tolist() == [
        5, 0, 0, 0, 0]
