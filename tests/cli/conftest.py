"""The data fixtures (a tiny BPE tokenizer, a small corpus) for the ``data`` command tests."""

import shutil

import pytest

from megacontext.core.assets import BASE_MODEL, PACKAGED
from tests.conftest import tiny_llama
from tests.data.conftest import corpus, tokenizer  # noqa: F401


@pytest.fixture
def tiny_dir_with_tokenizer(tmp_path):
    """A tiny random Llama with the embedded model's tokenizer (vocab 16384), saved like a hub model."""
    path = tmp_path / "tiny"
    tiny_llama(vocab=16384).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PACKAGED / BASE_MODEL / name, path / name)  # the packaged copy (not $MEGACONTEXT_MODELS)
    return path
