"""The contract between the benchmark and a contender: score target tokens of a stream under a budget.

A :class:`Sample` is one token stream (history, then the targets, possibly followed by nothing) and a
target range ``[target_start, target_end)``; token ``i`` of the range must be predicted from the tokens
before it. A :class:`System` returns per-target NLL and top-1 hits while the base model never reads more
than ``w_max`` input slots at once (the reference *full attention* system is the one documented exception).

Two levels, so very different systems plug in:
- :class:`System.score` is all the harness calls. MegaContext systems (engine-driven streaming NLL with
  recency / LensNet / oracle focus) implement it directly with a thin adapter and register in
  :mod:`megacontext.bench.registry`.
- :class:`~megacontext.bench.scoring.ContextSystem` (in :mod:`megacontext.bench.scoring`, which imports this
  contract and never the other way round) is for baselines that only choose which tokens the base model
  reads before a scored chunk. They implement ``select`` (pure: history ids -> a :class:`Selection` of at
  most ``budget`` ids with position ids) and inherit batched, chunked scoring: a chunk of ``h <= chunk``
  targets gets ``budget = w_max - h`` context slots, so every scored token sees between ``w_max - chunk``
  and ``w_max - 1`` slots.

Invariants: NaN NLL marks "not applicable" (e.g. full attention past the native window) and is excluded
from aggregates; systems never see tokens at or after the chunk start through ``select``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

PositionMode = Literal["compact", "absolute"]


@dataclass
class Sample:
    """One scoring request. ``tokens`` [N] int64 on CPU; targets are ``tokens[target_start:target_end]``."""

    sample_id: str
    tokens: Tensor
    target_start: int
    target_end: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = int(self.tokens.shape[0])
        if self.tokens.dim() != 1:
            raise ValueError(f"sample {self.sample_id!r}: tokens must be 1-D, got shape {tuple(self.tokens.shape)}")
        if not 1 <= self.target_start < self.target_end <= n:
            raise ValueError(f"sample {self.sample_id!r}: target range [{self.target_start}, {self.target_end}) "
                             f"must satisfy 1 <= start < end <= {n} (the first token has no context)")

    @property
    def n_targets(self) -> int:
        return self.target_end - self.target_start


@dataclass
class Scores:
    """Per-target results of one sample: ``nll`` [H] float32 (NaN = not applicable), ``top1`` [H] bool."""

    nll: Tensor
    top1: Tensor
    flops: float = 0.0  # base-model FLOPs spent on this sample, context rebuilds and compression included
    seconds: float = 0.0  # wall time attributed to this sample (its share of batched forwards)


@dataclass
class Selection:
    """What the base model reads before a chunk: ``ids`` [T] and ``positions`` [T]; the chunk's tokens then
    take positions ``next_position + arange(h)``. ``extra_flops``: model work spent choosing (e.g. LLMLingua)."""

    ids: Tensor
    positions: Tensor
    next_position: int
    extra_flops: float = 0.0


def place(pieces: list[Tensor], starts: list[int], mode: PositionMode) -> tuple[Tensor, Tensor, int]:
    """Concatenate id pieces taken from history offsets ``starts``; positions either ``absolute`` (their
    offsets in the stream, gaps kept) or ``compact`` (0..T-1, as StreamingLLM numbers its cache).
    Returns (ids [T], positions [T], next_position); absolute next_position is the end of the last piece."""
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if mode == "compact":
        return ids, torch.arange(ids.shape[0]), int(ids.shape[0])
    if mode != "absolute":
        raise ValueError(f"position mode {mode!r} is not supported; expected 'compact' or 'absolute'")
    pos = [torch.arange(s, s + p.shape[0]) for p, s in zip(pieces, starts, strict=True)]
    positions = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
    nxt = starts[-1] + int(pieces[-1].shape[0]) if pieces else 0
    return ids, positions, nxt


class System(ABC):
    """A contender. ``name`` is its row label in every table."""

    name: str = "system"
    #: tasks the system cannot run (e.g. too costly per position); the harness skips them with a message
    skip_tasks: frozenset[str] = frozenset()
    #: True when results do not depend on ``w_max`` (the full-attention reference): scored once per task
    budget_free: bool = False

    def describe(self) -> dict:
        """Settings that identify this system in result files."""
        return {"name": self.name}

    @abstractmethod
    def score(self, base, samples: list[Sample], w_max: int) -> list[Scores]:
        """Score every sample's target range with at most ``w_max`` base-model input slots per forward."""
