"""Fixtures for the data tests: a tiny byte-level BPE tokenizer trained in-process and a small mixed corpus."""

from __future__ import annotations

import json
import lzma
import random

import pytest

WORDS = [
    "the", "a", "of", "and", "to", "in", "was", "he", "she", "it", "said", "meeting", "project", "data",
    "model", "we", "they", "you", "speaker", "grad", "professor", "okay", "so", "um", "yeah", "right",
    "think", "know", "recording", "wireless", "mike", "book", "chapter", "night",
]
SENTENCES = [
    "The meeting was about the project and the data.",
    "Grad A: OK, we're on. So just make sure that your wireless mike is on.",
    "def main(args):\n    return 0\n",
    "It was a dark and stormy night; the rain fell in torrents.",
]


def _bpe_tokenizer(vocab: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(SENTENCES * 4 + [" ".join(WORDS)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer():
    return _bpe_tokenizer()


def prose(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def meeting(rng: random.Random, n_turns: int = 12) -> dict:
    turns = [{"speaker": rng.choice(["Grad A", "Professor B", "PhD C"]), "content": prose(rng, rng.randint(3, 30))}
             for _ in range(n_turns)]
    return {
        "topic_list": [{"topic": "setup", "relevant_text_span": [["0", "3"]]}],
        "general_query_list": [{"query": "Summarize the whole meeting", "answer": "They talked."}],
        "specific_query_list": [{"query": "What about the mike?", "answer": "It was on.",
                                 "relevant_text_span": [["1", "2"], ["5", "5"]]}],
        "meeting_transcripts": turns,
    }


@pytest.fixture
def corpus(tmp_path):
    """Paths of a small corpus of every kind: an .xz part, two .txt docs, QMSum json files and a code tree."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "dev").mkdir(parents=True)
    books = [prose(rng, rng.randint(300, 900)) for _ in range(5)]
    books.insert(2, "   \n  ")  # empty book between separators: skipped
    books.append("Tiny.")  # shorter than one block: skipped at tokenisation
    part = root / "train_00.txt.xz"
    part.write_bytes(lzma.compress("\x1e".join(books).encode()))
    (root / "dev" / "Author_Long_Book.txt").write_text(prose(rng, 3000))
    (root / "dev" / "Other_Book.txt").write_text(prose(rng, 1500))
    qdir = root / "qmsum" / "val"
    qdir.mkdir(parents=True)
    for i in range(3):
        (qdir / f"Meet{i:03d}.json").write_text(json.dumps(meeting(rng, 40 + 10 * i)))
    code = root / "lib"
    (code / "pkg").mkdir(parents=True)
    (code / "tests").mkdir()
    (code / "pkg" / "mod.py").write_text("def f(x):\n    return x + 1\n" * 40)
    (code / "top.py").write_text("import os\n\n\nclass A:\n    value = 3\n" * 30)
    (code / "tests" / "test_mod.py").write_text("def test():\n    assert True\n" * 40)
    return {"books": [part], "docs": [root / "dev"], "qmsum": [root / "qmsum"], "code": [code]}
