"""The data fixtures (a tiny BPE tokenizer, a small corpus) for the ``data`` command tests."""

from tests.data.conftest import corpus, tokenizer  # noqa: F401
