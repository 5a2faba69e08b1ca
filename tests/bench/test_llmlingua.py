"""LLMLingua adapter: the legacy-KV bridge is exact; the offline compressor runs on the 19M base (shared)."""

from __future__ import annotations

import pytest
import torch

from megacontext.bench.llmlingua_system import LegacyCacheModel, unavailable_reason

needs_llmlingua = pytest.mark.skipif(unavailable_reason() is not None, reason="llmlingua not installed")


def test_legacy_cache_bridge_matches_one_forward(tiny_base):
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    bridge = LegacyCacheModel(tiny_base)
    first = bridge(ids[:, :25], attention_mask=torch.ones(1, 25, dtype=torch.long))
    assert isinstance(first.past_key_values, list) and len(first.past_key_values) == 2  # legacy [(k, v)] per layer
    second = bridge(ids[:, 25:], attention_mask=torch.ones(1, 40, dtype=torch.long),
                    past_key_values=first.past_key_values)
    with torch.no_grad():
        ref = tiny_base.model(input_ids=ids).logits
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), ref, atol=1e-4, rtol=1e-4)


@needs_llmlingua
@pytest.mark.shared
def test_compressor_runs_offline_within_budget(monkeypatch):
    from megacontext.base import FrozenBase
    from megacontext.bench.llmlingua_system import LLMLinguaConfig, LLMLinguaSystem
    from tests.conftest import BASE_19M

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = FrozenBase.load(str(BASE_19M), device="cpu")
    system = LLMLinguaSystem(base, LLMLinguaConfig(recent_tokens=32, iterative_size=100))
    history = torch.tensor(base.encode("It was a dark and stormy night; the rain fell in torrents. " * 12))
    sel = system.select(history, budget=96)
    assert 32 < sel.ids.shape[0] <= 96
    assert torch.equal(sel.ids[-32:], history[-32:])  # the recent tokens stay raw
    assert sel.extra_flops > 0
