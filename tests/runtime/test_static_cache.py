"""Static KV cache across transformers versions: rewinding (crop where static layers have it, else re-prefill from
the kept prefix) gives a fresh read's logits with the same buffers, and the engine's static decode path is
actually taken (no fallback) and generates the dynamic path's and plain HF ``generate``'s greedy tokens.

Run under any installed transformers (e.g. 5.17, whose ``StaticLayer`` has no ``crop``, and 5.24)."""

from __future__ import annotations

import logging

import pytest
import torch

import megacontext.runtime.reader as reader_mod
from megacontext.base import FrozenBase
from megacontext.runtime.reader import rewind_static
from megacontext.runtime.sampling import SamplingConfig
from tests.conftest import tiny_llama, tree_engine
from tests.runtime.test_engine import _sharp

FALLBACK = "using the dynamic cache"


def _cache(model, cache) -> dict:
    """The cache keyword this transformers speaks (5.17: past_key_values; later: cache, the old name deprecated)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _no_crop(monkeypatch, cache) -> None:
    """Hide ``crop`` of the cache's layer classes, as in transformers versions without it."""
    for cls in {type(layer) for layer in cache.layers}:
        for klass in cls.__mro__:
            if "crop" in vars(klass):
                monkeypatch.delattr(klass, "crop")


@pytest.mark.parametrize("how", ["crop", "reprefill"])
@pytest.mark.parametrize("keep", [0, 1, 17, 39])
def test_rewind_static_equals_a_fresh_read(monkeypatch, how, keep):
    from transformers import DynamicCache, StaticCache

    model = _sharp(tiny_llama(seed=11))
    torch.manual_seed(12)
    ids, more = torch.randint(1, 128, (1, 40)), torch.randint(1, 128, (1, 9))
    cache = StaticCache(config=model.config, max_cache_len=64)
    mask = torch.ones(1, 64, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids, **_cache(model, cache), attention_mask=mask, use_cache=True)
        if how == "crop" and not all(callable(getattr(layer, "crop", None)) for layer in cache.layers):
            pytest.skip("this transformers' static layers have no crop")
        if how == "reprefill":
            _no_crop(monkeypatch, cache)
        ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
        rewind_static(cache, keep)
        assert int(cache.get_seq_length()) == keep
        assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == ptrs
        pos = torch.arange(keep, keep + more.shape[1])[None]
        got = model(input_ids=more, position_ids=pos, **_cache(model, cache), attention_mask=mask,
                    use_cache=True).logits
        full = torch.cat([ids[:, :keep], more], 1)
        want = model(input_ids=full, **_cache(model, DynamicCache(config=model.config)),
                     use_cache=True).logits[:, keep:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _count_rewinds(monkeypatch) -> list[int]:
    calls: list[int] = []

    def counting(cache, keep):
        calls.append(keep)
        rewind_static(cache, keep)

    monkeypatch.setattr(reader_mod, "rewind_static", counting, raising=False)
    return calls


@pytest.mark.parametrize("no_crop", [False, True])
def test_static_greedy_equals_dynamic_and_hf_generate(tmp_path, monkeypatch, caplog, no_crop):
    """Budget >= history: static == dynamic == HF ``generate`` greedy tokens, and the static path ran."""
    if no_crop:  # the re-prefill branch, whatever this transformers has
        from transformers import StaticCache

        probe = StaticCache(config=tiny_llama().config, max_cache_len=8)
        with torch.no_grad():
            m = tiny_llama()
            m(input_ids=torch.ones(1, 2, dtype=torch.long), **_cache(m, probe), use_cache=True)
        _no_crop(monkeypatch, probe)
    model = _sharp(tiny_llama(seed=7))
    base = FrozenBase(model, name="tiny")
    torch.manual_seed(4)
    hist, prompt = torch.randint(1, 128, (300,)), torch.randint(1, 128, (10,))
    outs = {}
    caplog.set_level(logging.WARNING)
    for fast in ("off", "static"):
        eng = tree_engine(base, tmp_path / fast, w_max=1024, recent_raw=64, fast_decode=fast)
        eng.ingest(hist)
        outs[fast] = list(eng.generate(prompt, SamplingConfig(max_new_tokens=40)))
    ctx = torch.cat([hist, prompt])[None]
    with torch.no_grad():
        ref = model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=40, min_new_tokens=40,
                             do_sample=False, pad_token_id=0)[0, ctx.shape[1]:].tolist()
    assert outs["static"] == outs["off"] == ref and len(set(ref)) > 5
    assert FALLBACK not in caplog.text


@pytest.mark.parametrize("no_crop", [False, True])
def test_static_path_with_a_changing_working_context(tmp_path, monkeypatch, caplog, no_crop):
    """A WC that refocuses while generating: the static cache is rewound to the common prefix (both branches),
    never falls back, and gives the dynamic path's tokens."""
    base = FrozenBase(_sharp(tiny_llama(seed=3)), name="tiny")
    torch.manual_seed(2)
    hist, prompt = torch.randint(1, 128, (700,)), torch.randint(1, 128, (20,))
    caplog.set_level(logging.WARNING)
    outs = {}
    for fast in ("off", "static"):
        eng = tree_engine(base, tmp_path / fast, w_max=160, recent_raw=64, focus="lexical", fast_decode=fast)
        eng.ingest(hist)
        if fast == "static":
            calls = _count_rewinds(monkeypatch)
            if no_crop:
                from transformers import StaticCache

                probe = StaticCache(config=base.model.config, max_cache_len=8)
                with torch.no_grad():
                    base.model(input_ids=torch.ones(1, 2, dtype=torch.long), **_cache(base.model, probe),
                               use_cache=True)
                _no_crop(monkeypatch, probe)
        outs[fast] = list(eng.generate(prompt, SamplingConfig(max_new_tokens=70)))
    assert outs["static"] == outs["off"] and len(set(outs["off"])) > 5
    assert FALLBACK not in caplog.text
    assert any(k > 0 for k in calls)  # partial rewinds happened (the WC changed under the cache)
