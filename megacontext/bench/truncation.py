"""Window baselines: truncation (the last ``budget`` tokens) and full attention (the reference).

- ``truncation`` reads the most recent ``budget`` tokens. Under RoPE, compact and absolute positions give
  the same attention (only differences matter), so positions are compact.
- ``full`` reads the *whole* history and therefore ignores the budget; it applies only while history plus
  chunk fit the base model's native window and marks later chunks not applicable (NaN). It is the quality
  ceiling for the positions where it exists, not a contender at ``w_max``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.bench.scoring import ContextSystem
from megacontext.bench.system import Selection
from megacontext.core.config import Config, check


def recent(history: Tensor, budget: int) -> Selection:
    """The last ``budget`` ids of ``history`` [s] at compact positions."""
    ids = history[-budget:] if budget < history.shape[0] else history
    return Selection(ids, torch.arange(ids.shape[0]), int(ids.shape[0]))


@dataclass
class WindowConfig(Config):
    chunk: int = 128
    batch_tokens: int = 65536

    def __post_init__(self):
        check(self.chunk >= 1, f"chunk={self.chunk} must be >= 1")
        check(self.batch_tokens >= 1, f"batch_tokens={self.batch_tokens} must be >= 1")


class Truncation(ContextSystem):
    name = "truncation"

    def __init__(self, cfg: WindowConfig | None = None):
        self.cfg = cfg or WindowConfig()
        self.chunk, self.batch_tokens = self.cfg.chunk, self.cfg.batch_tokens

    def describe(self) -> dict:
        return {"name": self.name, **self.cfg.to_dict()}

    def select(self, history: Tensor, budget: int) -> Selection:
        return recent(history, budget)


class FullAttention(ContextSystem):
    """Whole history, only where history + chunk <= ``native_window`` (over-budget by design)."""

    name = "full"
    respects_budget = False
    budget_free = True

    def __init__(self, native_window: int, cfg: WindowConfig | None = None):
        if native_window < 2:
            raise ValueError(f"native_window={native_window} must be >= 2")
        self.native_window = native_window
        self.cfg = cfg or WindowConfig()
        self.chunk, self.batch_tokens = self.cfg.chunk, self.cfg.batch_tokens

    def describe(self) -> dict:
        return {"name": self.name, "native_window": self.native_window, **self.cfg.to_dict()}

    def select(self, history: Tensor, budget: int) -> Selection | None:
        if history.shape[0] + self.chunk > self.native_window:
            return None
        return Selection(history, torch.arange(history.shape[0]), int(history.shape[0]))
