"""MegaContext API: create/ingest/generate/score, exact restore on reopen, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megacontext.api import ENGINE_FILE, WC_FILE, MegaContext, StoreError
from megacontext.base import FrozenBase
from megacontext.core.checkpoint import CheckpointError
from megacontext.runtime.engine import EngineConfig
from megacontext.wc.working_context import WorkingContextConfig, check_invariants
from tests.conftest import tiny_llama

CFG = EngineConfig(wc=WorkingContextConfig(w_max=160, recent_raw=64), focus="lexical", debug=True)


def _next_logits(mc: MegaContext) -> torch.Tensor:
    m = mc.engine.materialize()
    with torch.no_grad():
        return mc.base.forward(m.inputs_embeds[None], m.position_ids[None], logits_to_keep=1).logits[0, -1]


def test_reopen_restores_wc_and_logits(tiny_base, tmp_path):
    store = tmp_path / "mem"
    torch.manual_seed(0)
    with MegaContext.create(store, tiny_base, config=CFG, durable=False) as mc:
        assert mc.ingest(torch.randint(1, 128, (1500,))) == 1500
        out = list(mc.generate_ids(torch.randint(1, 128, (10,))))
        assert len(out) == 64
        state = [t.clone() for t in mc.engine.wc.state.fields()]
        logits, n, step = _next_logits(mc), mc.num_tokens, mc.engine.step
    with MegaContext.open(store, tiny_base) as mc:
        assert mc.num_tokens == n and mc.engine.step == step
        for a, b in zip(state, mc.engine.wc.state.fields(), strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(_next_logits(mc), logits)
        check_invariants(mc.engine.wc)
        res = mc.score(torch.randint(1, 128, (40,)))
        assert res.nll.shape == (40,) and torch.isfinite(res.nll).all()


def test_readonly_open_and_telemetry_summary(tiny_base, tmp_path):
    store = tmp_path / "mem"
    with MegaContext.create(store, tiny_base, config=CFG, durable=False) as mc:
        mc.ingest(torch.randint(1, 128, (400,)))
        summary = mc.close()
    assert summary["steps"] == 1 and summary["max_utilisation"] <= 1.0  # one lazy-ingest batch (ingest_batch 16384)
    with MegaContext.open(store, tiny_base, readonly=True) as mc:
        assert mc.num_tokens == 400
        with pytest.raises(StoreError, match="read-only"):
            mc.save()


def test_auto_gistnet_only_for_its_own_base(tiny_base):
    from megacontext.api import resolve_gistnet

    assert resolve_gistnet(tiny_base, "auto") is None  # the embedded GistNet was trained for another base
    assert resolve_gistnet(tiny_base, None) is None and resolve_gistnet(tiny_base, "x") == "x"


def test_auto_focus_is_lensnet_only_for_its_own_base(tiny_base, tmp_path):
    from megacontext.api import resolve_focus
    from megacontext.core.assets import BASE_MODEL, LENSNET_MODEL, PACKAGED

    cfg, lens = resolve_focus(EngineConfig(), tiny_base, None)  # the embedded LensNet fits another base
    assert (cfg.focus, lens) == ("lexical", None)
    cfg, lens = resolve_focus(EngineConfig(focus="recency"), tiny_base, None)
    assert (cfg.focus, lens) == ("recency", None)  # an explicit choice is kept
    with MegaContext.create(tmp_path / "m", tiny_base, durable=False) as mc:  # the store records the resolved name
        assert mc.engine.cfg.focus == "lexical"
    assert json.loads((tmp_path / "m" / ENGINE_FILE).read_text())["config"]["focus"] == "lexical"
    if (PACKAGED / BASE_MODEL / "model.safetensors").is_file():
        base = FrozenBase.load(BASE_MODEL, device="cpu")
        cfg, lens = resolve_focus(EngineConfig(), base, None)
        assert (cfg.focus, lens) == ("lensnet", LENSNET_MODEL)


def test_errors_are_clear(tiny_base, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        MegaContext.open(tmp_path / "nope", tiny_base)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="no engine.json"):
        MegaContext.open(tmp_path / "plain", tiny_base)
    with pytest.raises(StoreError, match="not empty"):
        MegaContext.create(tmp_path / "plain", tiny_base)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        MegaContext.create(tmp_path / "g", tiny_base, gistnet=str(tmp_path / "missing-gistnet"))
    with pytest.raises(CheckpointError, match="needs a LensNet checkpoint"):
        MegaContext.create(tmp_path / "l", tiny_base, config=EngineConfig(focus="lensnet"))
    with pytest.raises(ValueError, match="focus='telepathy'"):  # refused by the config, before any store exists
        MegaContext.create(tmp_path / "f", tiny_base, config=EngineConfig(focus="telepathy"))

    store = tmp_path / "mem"
    MegaContext.create(store, tiny_base, config=CFG, durable=False).close()
    other = FrozenBase(tiny_llama(seed=9), name="other")
    with pytest.raises(StoreError, match="fingerprint"):
        MegaContext.open(store, other)
    bad_cfg = EngineConfig(wc=WorkingContextConfig(w_max=999, recent_raw=64))
    with pytest.raises(StoreError, match="create a new store"):
        MegaContext.open(store, tiny_base, config=bad_cfg)
    (store / WC_FILE).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="damaged working-context"):
        MegaContext.open(store, tiny_base)
    meta = json.loads((store / ENGINE_FILE).read_text())
    meta["format_version"] = 99
    (store / ENGINE_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format_version=99"):
        MegaContext.open(store, tiny_base)


def test_lensnet_policy_plugs_in(tiny_base, tmp_path):
    """A LensNet checkpoint drives the focus through the same protocol (untrained net: all scores 0)."""
    from megacontext.lensnet.model import LensNet, LensNetConfig

    ckpt = tmp_path / "lens"
    LensNet(LensNetConfig(), tiny_base.d_model).save(ckpt, tiny_base)
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=160, recent_raw=64), focus="lensnet", debug=True)
    with MegaContext.create(tmp_path / "mem", tiny_base, lensnet=str(ckpt), config=cfg, durable=False) as mc:
        assert mc.engine.policy.name == "lensnet"
        mc.ingest(torch.randint(1, 128, (600,)))
        assert len(list(mc.generate_ids(torch.randint(1, 128, (8,))))) == 64
        check_invariants(mc.engine.wc)
    with MegaContext.open(tmp_path / "mem", tiny_base) as mc:  # the checkpoint path is remembered
        assert mc.engine.policy.name == "lensnet"


def test_corrupted_wc_tiling_is_a_store_error(tiny_base, tmp_path):
    store = tmp_path / "mem"
    with MegaContext.create(store, tiny_base, config=CFG, durable=False) as mc:
        mc.ingest(torch.randint(1, 128, (300,)))
    tensors = load_file(str(store / WC_FILE))
    tensors["levels"][-1] = 1  # the newest block, inside the protected recent tokens, as a gist
    save_file(tensors, str(store / WC_FILE))
    with pytest.raises(StoreError, match="not a legal tiling.*overlaps the protected recent 64 tokens"):
        MegaContext.open(store, tiny_base)


def test_stacked_lod2_gistnet_is_used_and_remembered(tiny_base, tmp_path):
    from megacontext.gistnet.model import GistNet, GistNetConfig

    lod1 = GistNet(GistNetConfig(layers=1, heads=2), tiny_base.d_model, tiny_base.embed_norm)
    lod1.save(tmp_path / "g1", tiny_base, extra={"levels": [1]})
    lod2 = GistNet(GistNetConfig(layers=1, heads=2), tiny_base.d_model, tiny_base.embed_norm)
    lod2.save(tmp_path / "g2", tiny_base, extra={"levels": [2], "lod1_weights_hash": lod1.weights_hash()})
    cfg = EngineConfig(wc=WorkingContextConfig(w_max=256, recent_raw=64))
    with MegaContext.create(tmp_path / "s", tiny_base, gistnet=str(tmp_path / "g1"), gistnet_lod2=str(tmp_path / "g2"),
                            config=cfg) as mc:
        version = mc.tree.compressor.version
        assert f":l2-{lod2.weights_hash()[:8]}" in version
    with MegaContext.open(tmp_path / "s", tiny_base) as mc:
        assert mc.tree.compressor.version == version  # the pairing is part of the store
    other = GistNet(GistNetConfig(layers=1, heads=2), tiny_base.d_model, tiny_base.embed_norm)
    other.save(tmp_path / "g3", tiny_base)
    with pytest.raises(CheckpointError, match="trained on LOD1 gists of weights"):
        MegaContext.create(tmp_path / "t", tiny_base, gistnet=str(tmp_path / "g3"), gistnet_lod2=str(tmp_path / "g2"))
