"""Frozen base adapter: parity with the unmodified model, RoPE behaviour, frozenness, fingerprints, errors."""

from __future__ import annotations

import json

import pytest
import torch

from megacontext.base import BaseModelError, FrozenBase, weights_fingerprint
from tests.conftest import BASE_19M, SHARED, tiny_llama


def test_load_from_pretrained_is_frozen_and_reports_sizes(tiny_model_dir):
    base = FrozenBase.load(str(tiny_model_dir), device="cpu")
    assert base.dtype == torch.float32  # CPU default
    assert not base.model.training
    assert all(not p.requires_grad for p in base.model.parameters())
    assert (base.d_model, base.vocab_size) == (32, 128)
    assert base.native_window == 4096  # from max_position_embeddings (no other field)
    base.native_window_override = 2048
    assert base.native_window == 2048


def test_embedding_path_reproduces_input_ids_logits(tiny_model):
    base = FrozenBase(tiny_model)
    ids = torch.randint(0, 128, (2, 40))
    ref = tiny_model(input_ids=ids).logits
    out = base.forward(base.embed(ids), torch.arange(40)).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_nll_matches_cross_entropy_on_shifted_logits(tiny_model):
    base = FrozenBase(tiny_model)
    ids = torch.randint(0, 128, (3, 50))
    logits = tiny_model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, -11:-1].reshape(-1, 128), ids[:, -10:].reshape(-1),
                                            reduction="none").view(3, 10)
    got = base.nll(base.embed(ids), torch.arange(50), ids[:, -10:])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_position_shift_invariance_and_sensitivity(tiny_model):
    """RoPE depends only on relative positions: shifting every position by k leaves logits unchanged
    (up to float error), while changing one distance changes them."""
    base = FrozenBase(tiny_model)
    ids = torch.randint(0, 128, (1, 24))
    emb = base.embed(ids)
    pos = torch.arange(24)
    ref = base.forward(emb, pos).logits
    shifted = base.forward(emb, pos + 1000).logits
    torch.testing.assert_close(shifted, ref, rtol=1e-4, atol=1e-4)
    gapped = pos.clone()
    gapped[12:] += 500  # a gap between two halves: second-half logits must change
    out = base.forward(emb, gapped).logits
    torch.testing.assert_close(out[:, :12], ref[:, :12], rtol=1e-5, atol=1e-5)
    assert (out[:, 12:] - ref[:, 12:]).abs().max() > 1e-3


def test_position_jumps_do_not_split_attention(tiny_model):
    """Gists sit at span centres, so positions jump; the adapter must not let the model treat a jump as
    a packed-sequence boundary (transformers >= 5 does so when no mask is given)."""
    base = FrozenBase(tiny_model)
    ids = torch.randint(0, 128, (1, 20))
    emb = base.embed(ids)
    pos = torch.arange(20)
    pos[10:] += 100
    ones = torch.ones(1, 20, dtype=torch.long)
    explicit = base.forward(emb, pos, attention_mask=ones).logits
    torch.testing.assert_close(base.forward(emb, pos).logits, explicit, rtol=0, atol=0)
    # and the second half really reads the first: changing an early token changes late logits
    emb2 = emb.clone()
    emb2[:, 0] += 1.0
    assert (base.forward(emb2, pos).logits[:, 15:] - explicit[:, 15:]).abs().max() > 1e-4


def test_backward_reaches_upstream_but_base_weights_stay_bit_identical(tiny_model):
    base = FrozenBase(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    upstream = torch.nn.Parameter(torch.randn(1, 8, 32) * 0.1)
    opt = torch.optim.SGD([upstream], lr=1.0)
    ids = torch.randint(0, 128, (1, 16))
    embeds = torch.cat([upstream, base.embed(ids)], dim=1)
    loss = base.nll(embeds, torch.arange(24), ids[:, -8:]).mean()
    loss.backward()
    assert upstream.grad is not None and upstream.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.parameters())
    opt.step()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fingerprint_stable_across_dtype_and_sensitive_to_weights():
    a = tiny_llama(seed=0)
    fp = weights_fingerprint(a)
    assert weights_fingerprint(tiny_llama(seed=0).to(torch.bfloat16)) == fp
    assert weights_fingerprint(tiny_llama(seed=1)) != fp


def test_kv_cache_continuation_matches_full_forward(tiny_model):
    base = FrozenBase(tiny_model)
    ids = torch.randint(0, 128, (1, 30))
    emb, pos = base.embed(ids), torch.arange(30)
    full = base.forward(emb, pos).logits
    first = base.forward(emb[:, :20], pos[:20], use_cache=True)
    rest = base.forward(emb[:, 20:], pos[20:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(rest, full[:, 20:], rtol=1e-4, atol=1e-4)


def test_clear_errors(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        FrozenBase.load(str(tmp_path / "nope"))
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BaseModelError, match="not a causal LM|could not load"):
        FrozenBase.load(str(tmp_path / "enc"))

    class NoEmbeds(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(BaseModelError, match="inputs_embeds"):
        FrozenBase(NoEmbeds(), name="no-embeds")


@pytest.mark.shared
def test_stand_in_model_loss_on_dev_slice():
    base = FrozenBase.load(str(BASE_19M), device="cpu")
    book = sorted((SHARED / "data" / "books" / "dev").glob("*.txt"))[0]
    ids = torch.tensor([base.encode(book.read_text()[50_000:60_000])[:1024]])
    with torch.no_grad():
        nll = base.nll(base.embed(ids), torch.arange(ids.shape[1]), ids[:, 1:]).mean()
    assert nll < 4.0, f"stand-in loss {nll:.3f} nats/token on a dev slice"
