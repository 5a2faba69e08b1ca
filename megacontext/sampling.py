"""Next-token choice for generation: greedy, temperature, top-k and nucleus (top-p) sampling, stop rules.

Pure functions of a logits vector plus a seeded ``torch.Generator``, so a run with a seed is repeatable
on one device. ``temperature == 0`` means greedy (argmax), which is what parity tests rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.config import Config, check


@dataclass
class SamplingConfig(Config):
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()  # stop after emitting any of these (the tokenizer's EOS is added)
    stop_strings: tuple[str, ...] = ()  # stop once the generated text contains any of these

    def __post_init__(self):
        check(self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0")
        check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)")
        check(0 < self.top_p <= 1, f"top_p={self.top_p} must lie in (0, 1]")
        self.stop_tokens = tuple(int(t) for t in self.stop_tokens)
        self.stop_strings = tuple(self.stop_strings)


def choose_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """logits [V] -> 0-dim int64 token id (on the logits' device)."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax()
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
