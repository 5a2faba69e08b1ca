"""Issue 14: "any HF causal LM". Parity with the plain model on tiny random models of many families (the budget
holds the whole history, so ``score`` must equal the model's own NLL), learned absolute position tables,
models that take no position ids, and state-space models refused up front."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf

from megacontext.api import MegaContext
from megacontext.base import BaseModelError, FrozenBase
from megacontext.runtime.engine import EngineConfig
from megacontext.runtime.sampling import SamplingConfig
from megacontext.wc.working_context import WorkingContextConfig

V, D, N_POS = 96, 32, 256
_COMMON = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=D, intermediate_size=64, num_key_value_heads=2,
                                                        **_COMMON)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=D, intermediate_size=64, num_key_value_heads=2,
                                                        **_COMMON)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(hidden_size=D, intermediate_size=64,
                                                              num_key_value_heads=2, **_COMMON)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=D, intermediate_size=64, **_COMMON)),
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(hidden_size=D, intermediate_size=64, **_COMMON)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=D, **_COMMON)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(hidden_size=D, intermediate_size=64, head_dim=8,
                                                           num_key_value_heads=2, **_COMMON)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=V,
                                                     n_positions=N_POS)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=D, ffn_dim=64, word_embed_proj_dim=D,
                                                  max_position_embeddings=N_POS, **_COMMON)),
}
CFG = EngineConfig(wc=WorkingContextConfig(w_max=192, recent_raw=64))


def _model(family: str):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_score_equals_the_plain_model_when_the_budget_holds_everything(family, tmp_path):
    model = _model(family)
    ids = torch.randint(0, V, (150,), generator=torch.Generator().manual_seed(1))
    with MegaContext.create(tmp_path / "s", FrozenBase(model, name=family), gistnet=None, config=CFG,
                            durable=False) as mc:
        got = mc.score(ids).nll
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    want = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    assert torch.isnan(got[0])
    torch.testing.assert_close(got[1:], want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_learned_position_tables_get_compact_positions(family, tmp_path, caplog):
    base = FrozenBase(_model(family), name=family)
    assert base.position_limit == N_POS
    ids = torch.randint(0, V, (3 * N_POS,), generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING), MegaContext.create(tmp_path / "s", base, gistnet=None, config=CFG,
                                                             durable=False) as mc:
        assert mc.engine.cfg.wc.position_mode == "compact"
        mc.ingest(ids)  # the history runs far past the table
        assert torch.isfinite(mc.score(ids[:40]).nll[1:]).all()
        assert len(list(mc.generate_ids(ids[:3], SamplingConfig(max_new_tokens=5)))) == 5
    assert "learned absolute position" in caplog.text
    too_wide = EngineConfig(wc=WorkingContextConfig(w_max=N_POS, recent_raw=64))
    with pytest.raises(ValueError, match=rf"w_max \+ k = {N_POS + 32}.*{N_POS} positions"):
        MegaContext.create(tmp_path / "t", base, gistnet=None, config=too_wide, durable=False)


def test_models_without_position_ids_are_warned_about(tmp_path, caplog):
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=D, n_layer=2, n_head=4, vocab_size=V)).eval()
    with caplog.at_level(logging.WARNING):
        base = FrozenBase(model, name="bloom")
    assert "position_ids" in caplog.text and base.takes_positions is False
    with MegaContext.create(tmp_path / "s", base, gistnet=None, config=CFG, durable=False) as mc:
        assert mc.engine.cfg.wc.position_mode == "compact"
        ids = torch.randint(0, V, (150,), generator=torch.Generator().manual_seed(1))
        got = mc.score(ids).nll
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(input_ids=ids[None]).logits[0, :-1], ids[1:], reduction="none")
    torch.testing.assert_close(got[1:], want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba", "rwkv"])
def test_state_space_models_are_refused_up_front(family):
    torch.manual_seed(0)
    model = {
        "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(hidden_size=D, num_hidden_layers=2, vocab_size=V)),
        "mamba2": lambda: tf.Mamba2ForCausalLM(tf.Mamba2Config(hidden_size=D, num_hidden_layers=2, vocab_size=V,
                                                               num_heads=4, head_dim=16, n_groups=1)),
        "falcon_mamba": lambda: tf.FalconMambaForCausalLM(tf.FalconMambaConfig(hidden_size=D, num_hidden_layers=2,
                                                                             vocab_size=V)),
        "rwkv": lambda: tf.RwkvForCausalLM(tf.RwkvConfig(hidden_size=D, num_hidden_layers=2, vocab_size=V,
                                                         attention_hidden_size=D, intermediate_size=64)),
    }[family]()
    with pytest.raises(BaseModelError, match="state-space"):
        FrozenBase(model, name=family)
