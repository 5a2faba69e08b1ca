"""Fixtures for the stand-in recipe's tests: the real tokenizer (v1 and v2 share it: the embedded v2 model
dir has it), a tiny random Llama with that vocabulary, tiny generated corpora (no third-party text). Tests
that need the real v1 weights find them in ../shared/models/ and skip without it."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
V1_CANDIDATES = (REPO.parent / "shared" / "models" / "base-llama-19m",)
TOKENIZER_DIR = REPO / "megacontext" / "assets" / "models" / "base-llama-19m-v2"  # v1's tokenizer, unchanged


def v1_dir() -> Path | None:
    return next((p for p in V1_CANDIDATES if (p / "tokenizer.json").is_file()), None)


@pytest.fixture(scope="session")
def tok_dir() -> Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"the stand-in tokenizer ({TOKENIZER_DIR}) is not in this checkout")
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tok_dir)


def tiny_vocab_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=16384, max_position_embeddings=65536, rope_theta=500000.0,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok_dir) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, the v1 vocabulary) saved with the v1 tokenizer files."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_vocab_llama().save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, d / name)
    return d


def generated_books(n: int = 10, chars: int = 30_000) -> list[str]:
    from megacontext.demo.input import ships_log

    return [ships_log(chars, seed=i)[0] for i in range(n)]


@pytest.fixture(scope="session")
def books_xz(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("books") / "books.txt.xz"
    with lzma.open(p, "wt") as f:
        f.write("\n\n\x1e\n\n".join(generated_books()))
    return p


@pytest.fixture(scope="session")
def code_root(tmp_path_factory) -> Path:
    """A small folder of Python files (copies of this repo's standin/ and megacontext/eval/ modules)."""
    root = tmp_path_factory.mktemp("code")
    for i, src in enumerate(sorted((REPO / "standin").glob("*.py")) + sorted((REPO / "megacontext").glob("*.py"))):
        shutil.copyfile(src, root / f"m{i:03d}_{src.name}")
    return root


@pytest.fixture(scope="session")
def token_streams(tokenizer):
    """(books, code) uint16 token streams for batch tests."""
    from standin.corpus import encode_docs

    books = encode_docs(tokenizer, generated_books(6, 20_000), tokenizer.eos_token_id)
    code = encode_docs(tokenizer, [p.read_text() for p in sorted((REPO / "megacontext").glob("*.py"))],
                       tokenizer.eos_token_id)
    return books, code


@pytest.fixture
def rng():
    return np.random.default_rng(0)
