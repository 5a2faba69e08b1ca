"""StreamingLLM-style attention sinks: the first ``sinks`` tokens of the stream plus the most recent ones.

Positions (``positions`` setting):
- ``compact`` (default, what StreamingLLM does): ids are numbered by their slot in the window, 0..T-1, so
  the recent tokens sit right after the sinks and no relative distance exceeds the budget;
- ``absolute``: every token keeps its stream position, leaving a gap between sinks and recent tokens
  (tests whether the base model's long-distance RoPE tolerance helps the sinks).
Until the history exceeds the budget the selection equals the whole history (no sink is duplicated).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from megacontext.bench.scoring import ContextSystem
from megacontext.bench.system import PositionMode, Selection, place
from megacontext.core.config import Config, check


@dataclass
class SinksConfig(Config):
    sinks: int = 4
    positions: PositionMode = "compact"  # compact (slots 0..T-1, as StreamingLLM) or absolute (stream positions)
    chunk: int = 128
    batch_tokens: int = 65536

    def __post_init__(self):
        check(self.sinks >= 1, f"sinks={self.sinks} must be >= 1")
        check(self.positions in ("compact", "absolute"),
              f"positions={self.positions!r} must be 'compact' or 'absolute'")
        check(self.chunk >= 1, f"chunk={self.chunk} must be >= 1")
        check(self.batch_tokens >= 1, f"batch_tokens={self.batch_tokens} must be >= 1")


def sink_selection(history: Tensor, budget: int, sinks: int, mode: PositionMode) -> Selection:
    """First ``sinks`` + last ``budget - sinks`` ids of ``history`` [s] (all of it when it fits)."""
    s = int(history.shape[0])
    if s <= budget:
        ids, pos, nxt = place([history], [0], mode)
        return Selection(ids, pos, nxt)
    if budget <= sinks:
        raise ValueError(f"budget={budget} leaves no room for recent tokens after {sinks} sinks")
    keep = budget - sinks
    ids, pos, nxt = place([history[:sinks], history[s - keep:]], [0, s - keep], mode)
    return Selection(ids, pos, nxt)


class AttentionSinks(ContextSystem):
    def __init__(self, cfg: SinksConfig | None = None):
        self.cfg = cfg or SinksConfig()
        self.name = f"sinks-{self.cfg.positions}"
        self.chunk, self.batch_tokens = self.cfg.chunk, self.cfg.batch_tokens

    def describe(self) -> dict:
        return {"name": self.name, **self.cfg.to_dict()}

    def select(self, history: Tensor, budget: int) -> Selection:
        return sink_selection(history, budget, self.cfg.sinks, self.cfg.positions)
