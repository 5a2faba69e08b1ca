"""The recall grammar: evaluation phrasings can never come out of the training grammar."""

from __future__ import annotations

import random
import re

import pytest

from standin import grammar as G

PATTERNS = G.train_patterns()
SLOTS = G.train_slot_patterns()


def _train_fillers(rng):
    e = G.TRAIN.name(rng)
    a = rng.choice(G.TRAIN.attr_names)
    return e, a, G.TRAIN.value(G.TRAIN.attributes[a], rng)


def test_train_patterns_recognise_train_output():
    # the detector must accept what the train grammar makes, or the disjointness tests below prove nothing
    rng = random.Random(0)
    for _ in range(300):
        e, a, v = _train_fillers(rng)
        for f in G.TRAIN_STATEMENTS:
            assert G.train_could_generate(f.format(E=e, A=a, V=v), PATTERNS), f
        for f in G.TRAIN_QUESTIONS:
            assert G.train_could_generate(f.format(E=e, A=a), PATTERNS), f
        st, q = G.TRAIN.passkey(str(rng.randrange(10000, 99999)), rng)
        assert G.train_could_generate(st, PATTERNS) and G.train_could_generate(q, PATTERNS)


def test_eval_names_cannot_be_train_names():
    rng = random.Random(1)
    name_re = re.compile(SLOTS["E"])
    word_re = re.compile(SLOTS["V"])
    for _ in range(3000):
        n = G.EVAL.name(rng)
        assert not name_re.fullmatch(n), n
        w = G.EVAL.word(rng)
        assert not word_re.fullmatch(w), w  # eval name-values are no train value either
    assert all(name_re.fullmatch(G.TRAIN.name(rng)) for _ in range(500))


def test_eval_attributes_never_occur_in_train_strings():
    train_strings = list(G.TRAIN_ATTRIBUTES) + list(G.TRAIN_STATEMENTS + G.TRAIN_QUESTIONS) + list(
        G.TRAIN_KEY_NOUNS + G.TRAIN_KEY_STATEMENTS + G.TRAIN_KEY_QUESTIONS)
    for a in G.EVAL_ATTRIBUTES:
        for s in train_strings:
            assert not re.search(rf"\b{re.escape(a)}\b", s, re.I), (a, s)
    assert not set(G.EVAL_ATTRIBUTES) & set(G.TRAIN_ATTRIBUTES)


@pytest.mark.parametrize("frame", G.EVAL_STATEMENTS + G.EVAL_QUESTIONS)
def test_eval_frames_differ_from_every_train_frame(frame):
    # rendered with TRAIN fillers, so only the frame's own wording can tell it apart
    rng = random.Random(2)
    for _ in range(50):
        e, a, v = _train_fillers(rng)
        text = frame.format(E=e, A=a, V=v)
        assert not G.train_could_generate(text, PATTERNS), text


def test_eval_rendered_facts_cannot_be_generated():
    rng = random.Random(3)
    for _ in range(300):
        facts = G.EVAL.facts(3, rng)
        for f in facts:
            frame, text = G.EVAL.statement(f, rng)
            assert not G.train_could_generate(text, PATTERNS)
            assert not G.train_could_generate(G.EVAL.question(f, frame, rng), PATTERNS)


def test_benchmark_passkey_and_demo_facts_are_eval_only():
    key = "48213"
    assert not G.train_could_generate(G.EVAL_KEY_STATEMENT.format(K=key), PATTERNS)
    assert not G.train_could_generate(G.EVAL_KEY_QUESTION.strip(), PATTERNS)
    for s in G.TRAIN_KEY_NOUNS + G.TRAIN_KEY_STATEMENTS + G.TRAIN_KEY_QUESTIONS:
        assert "pass key" not in s.lower()
    for prefix in G.DEMO_FACT_PREFIXES:
        assert not G.train_could_generate(prefix, PATTERNS)


def test_question_wording_differs_from_statement_before_the_value():
    for g in (G.TRAIN, G.EVAL):
        rng = random.Random(4)
        for _ in range(2000):
            f = g.facts(1, rng)[0]
            frame, _ = g.statement(f, rng)
            q = g.question(f, frame, rng)
            before = frame.split("{V}")[0].format(E=f[0], A=f[1]).rstrip()
            if before:
                assert q.rstrip()[-G.SURFACE_CHARS:] != before[-G.SURFACE_CHARS:], (frame, q)


def test_answer_tokens_are_stable_in_context(tokenizer):
    enc = lambda s: tokenizer.backend_tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    rng = random.Random(5)
    for g in (G.TRAIN, G.EVAL):
        for _ in range(200):
            f = g.facts(1, rng)[0]
            frame, stmt = g.statement(f, rng)
            q = g.question(f, frame, rng)
            v = " " + f[2]
            assert enc(q + v + ".") == enc(q) + enc(v) + enc(".")
            i = stmt.index(f[2])
            # the value's tokens appear unchanged inside the statement
            ids, val = enc(" " + stmt), enc(v)
            assert any(ids[j:j + len(val)] == val for j in range(len(ids))), (stmt, i)
