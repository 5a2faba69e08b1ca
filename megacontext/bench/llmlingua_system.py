"""LLMLingua token dropping (``llmlingua`` package, v0.2.2), scored by the same frozen base model.

Rule for a chunk with context budget ``B``: the last ``recent_tokens`` of the history stay raw (they play
the role of LLMLingua's question); the older history is decoded to text, compressed by
``PromptCompressor.compress_prompt`` to ``B - recent_tokens`` tokens (token-level filter only; the text is
one context), re-encoded with the base tokenizer and cut from the front if the tokenizer round trip
overshoots. Positions are compact. LLMLingua's own cost (its base-model passes over the history) is charged
as ``extra_flops``.

Offline work-arounds for llmlingua 0.2.2 (all applied in :func:`make_compressor`, nothing is patched
globally or persistently):
1. ``PromptCompressor.__init__`` calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")``, which downloads the
   cl100k BPE file; offline this raises. That encoder only *reports* token counts (``origin_tokens`` /
   ``compressed_tokens``); budgets use the scoring model's tokenizer. We hand it an encoder over the base
   tokenizer during construction.
2. ``load_model`` would load a second copy of the model from a hub id or path; we install the already loaded
   frozen base (same weights, same device) and its tokenizer instead.
3. llmlingua slices KV caches as legacy ``[(k, v), ...]`` lists; transformers 5 returns ``Cache`` objects and
   no longer accepts the lists. The model handed to llmlingua converts both ways around the base's forward.
nltk data is not needed (sentence-level filtering stays off). Per-chunk compression of 100k-token streams
is far too slow, so the perplexity tasks are skipped for this system.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch
from torch import Tensor

from megacontext.bench.flops import flop_model
from megacontext.bench.scoring import ContextSystem
from megacontext.bench.system import Selection
from megacontext.core.config import Config, check

log = logging.getLogger(__name__)

PINNED_VERSION = "0.2.2"


def unavailable_reason() -> str | None:
    """Why the LLMLingua system cannot run here, or None when it can."""
    try:
        import llmlingua  # noqa: F401
    except ImportError as e:
        return f"the llmlingua package is not installed ({e}); pip install 'llmlingua=={PINNED_VERSION}'"
    return None


@dataclass
class LLMLinguaConfig(Config):
    recent_tokens: int = 128
    iterative_size: int = 200
    chunk: int = 128
    batch_tokens: int = 65536

    def __post_init__(self):
        check(self.recent_tokens >= 1, f"recent_tokens={self.recent_tokens} must be >= 1")
        check(self.iterative_size >= 1, f"iterative_size={self.iterative_size} must be >= 1")
        check(self.chunk >= 1, f"chunk={self.chunk} must be >= 1")
        check(self.batch_tokens >= 1, f"batch_tokens={self.batch_tokens} must be >= 1")


class _TokenCounter:
    """Stands in for the tiktoken encoder llmlingua uses to report counts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, **_) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _to_cache(legacy):
    if legacy is None:
        return None
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(legacy):
        cache.update(k, v, layer)
    return cache


def _to_legacy(cache) -> list[list[Tensor]]:
    return [[layer.keys, layer.values] for layer in cache.layers]


class LegacyCacheModel:
    """The callable llmlingua treats as its model: legacy KV lists in and out, the frozen base inside."""

    def __init__(self, base):
        self.base = base
        self.device = base.device

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, past_key_values=None,
                 use_cache: bool = True, **_):
        past = 0 if past_key_values is None else int(past_key_values[0][0].shape[-2])
        positions = past + torch.arange(input_ids.shape[1], device=input_ids.device)  # [L]
        out = self.base.forward(self.base.embed(input_ids), positions, attention_mask=attention_mask,
                                past_key_values=_to_cache(past_key_values), use_cache=True)
        return SimpleNamespace(logits=out.logits, past_key_values=_to_legacy(out.past_key_values))


def make_compressor(base):
    """A ``PromptCompressor`` over ``base`` that never touches the network (see module docstring)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    if base.tokenizer is None:
        raise ValueError(f"LLMLingua needs text: base model {base.name!r} has no tokenizer")
    import llmlingua.prompt_compressor as pc

    tokenizer = base.tokenizer

    def install(self, model_name, device_map="cuda", model_config=None):
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = tokenizer.eos_token_id
        self.tokenizer, self.model = tokenizer, LegacyCacheModel(base)
        self.device = str(base.device)
        self.context_idxs = []
        self.max_position_embeddings = base.native_window

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(pc.tiktoken, "encoding_for_model", lambda _: _TokenCounter(tokenizer)))
        stack.enter_context(mock.patch.object(pc.PromptCompressor, "load_model", install))
        return pc.PromptCompressor(model_name=base.name, device_map=str(base.device))


class LLMLinguaSystem(ContextSystem):
    name = "llmlingua"
    skip_tasks = frozenset({"books_ppl", "code_ppl"})

    def __init__(self, base, cfg: LLMLinguaConfig | None = None):
        self.cfg = cfg or LLMLinguaConfig()
        self.chunk, self.batch_tokens = self.cfg.chunk, self.cfg.batch_tokens
        self.base = base
        self.compressor = make_compressor(base)
        self.flops = flop_model(base)

    def describe(self) -> dict:
        return {"name": self.name, "llmlingua": PINNED_VERSION, **self.cfg.to_dict()}

    def _compression_flops(self, n: int) -> float:
        if self.flops is None:
            return float("nan")
        window = max(1, min(n, self.base.native_window))
        return self.flops.forward(window) * n / window  # llmlingua streams the history once, window-bounded

    @torch.inference_mode()
    def select(self, history: Tensor, budget: int) -> Selection:
        s = int(history.shape[0])
        if s <= budget:
            return Selection(history, torch.arange(s), s)
        recent = min(self.cfg.recent_tokens, budget - 1)
        target = budget - recent
        older_text = self.base.decode(history[:s - recent].tolist())
        out = self.compressor.compress_prompt(older_text, target_token=target, iterative_size=self.cfg.iterative_size,
                                              use_context_level_filter=False, use_sentence_level_filter=False)
        kept = torch.tensor(self.base.encode(out["compressed_prompt"]), dtype=torch.long)[-target:]
        ids = torch.cat([kept, history[s - recent:]])
        return Selection(ids, torch.arange(ids.shape[0]), int(ids.shape[0]), self._compression_flops(s - recent))
