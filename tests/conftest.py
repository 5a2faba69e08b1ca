"""Shared fixtures: tiny random Llama models built in-process (no downloads, seconds to run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BASE_19M = SHARED / "models" / "base-llama-19m"


def tiny_llama(hidden: int = 32, layers: int = 2, vocab: int = 128, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True, **kw)
    return LlamaForCausalLM(cfg).eval()


def tree_engine(base, tmp_path, w_max=4096, recent_raw=64, **kw):
    """An Engine over a fresh non-durable tree with mean-pooled gists (EngineConfig fields in ``kw``)."""
    from megacontext.runtime.engine import Engine, EngineConfig
    from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig
    from megacontext.wc import WorkingContextConfig

    tree = MegaContextTree.create(tmp_path / "store", base.d_model, base.fingerprint,
                                  MeanPoolCompressor.from_base(base), config=TreeConfig(durable=False))
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=w_max, recent_raw=recent_raw), **kw)
    return Engine(base, tree, cfg)


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_base():
    from megacontext.base import FrozenBase

    return FrozenBase(tiny_llama(), name="tiny-llama")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama saved with save_pretrained, so from_pretrained paths are exercised."""
    model = tiny_llama()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _skip_gpu(request):
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.node.get_closest_marker("shared") and not BASE_19M.is_dir():
        pytest.skip("needs ../shared assets")
