"""Analytic FLOPs of the base model's forward pass, read from its Hugging Face config.

Counted: the matmuls (2 FLOPs per multiply-add) of the attention projections, the gated MLP, causal
attention scores and value mixing (token i attends to i + 1 keys), and the vocabulary projection only for
the positions whose logits are kept. Not counted: norms, RoPE, softmax, embedding lookup (all O(L * d)).

Design choice: cost is charged per *forward*, so a baseline that rebuilds a 2,048-token context to score 128
tokens pays for the whole 2,048 — that is the honest cost of chunked evaluation, and the harness reports it
as FLOPs per scored token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlopModel:
    layers: int
    d_model: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> FlopModel:
        """Llama-style field names (hidden_size, num_hidden_layers, ...); GQA aware."""
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if getattr(config, k, None) is None]
        if missing:
            raise ValueError(f"cannot count FLOPs: base config {type(config).__name__} lacks {missing}; "
                             "expected a Llama-style decoder config")
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=int(config.num_hidden_layers), d_model=int(config.hidden_size), q_heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
                   ffn=int(config.intermediate_size), vocab=int(config.vocab_size))

    @property
    def linear_per_token(self) -> int:
        """Projection + MLP FLOPs of one token through all layers (no attention mixing, no LM head)."""
        d, hd = self.d_model, self.head_dim
        attn_proj = d * self.q_heads * hd + 2 * d * self.kv_heads * hd + self.q_heads * hd * d
        mlp = 3 * d * self.ffn
        return 2 * self.layers * (attn_proj + mlp)

    def forward(self, length: int, logits_kept: int | None = None) -> float:
        """FLOPs of one causal forward over ``length`` tokens keeping ``logits_kept`` rows of logits."""
        kept = length if logits_kept is None else min(logits_kept, length)
        attn_pairs = length * (length + 1) / 2  # causal: sum over tokens of keys attended
        mixing = 2 * 2 * self.layers * self.q_heads * self.head_dim * attn_pairs  # QK^T and AV
        return float(self.linear_per_token * length + mixing + 2 * self.d_model * self.vocab * kept)


def flop_model(base) -> FlopModel | None:
    """FlopModel of a FrozenBase, or None (with a warning) when its config is not Llama-like."""
    try:
        return FlopModel.from_config(base.config)
    except ValueError as e:
        log.warning("%s; FLOPs will be reported as n/a", e)
        return None
