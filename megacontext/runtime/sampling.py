"""Next-token choice for generation: greedy, temperature, top-k and nucleus (top-p) sampling, stop rules.

The cuts are transformers' own logits warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper`` in a ``LogitsProcessorList``, applied in that order as ``generate`` does), so a
sampled continuation means what it means everywhere else in the HF ecosystem; only the draw is ours: one
``torch.multinomial`` with a seeded ``torch.Generator``, so a run with a seed is repeatable on one device.
``temperature == 0`` means greedy (argmax), which is what parity tests rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from megacontext.core.config import Config, check


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


class Sampler:
    """Chooses token ids from next-token logits under one :class:`SamplingConfig` (built once per generation)."""

    def __init__(self, cfg: SamplingConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.warpers = LogitsProcessorList()
        if cfg.temperature > 0:
            self.warpers.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k:
                self.warpers.append(TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1:
                self.warpers.append(TopPLogitsWarper(cfg.top_p))
        self.generator = None
        if cfg.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed)
        self._no_ids = torch.zeros(1, 0, dtype=torch.long)  # the warpers used here never read the prompt ids

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [V] -> 0-dim int64 token id (on the logits' device)."""
        logits = logits.float()
        if self.cfg.temperature == 0:
            return logits.argmax()
        scores = self.warpers(self._no_ids.to(logits.device), logits[None])[0]  # [V], cut tokens at -inf
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[0]
