"""Working Context: what the frozen base model reads — a budgeted, block-aligned tiling of the history.

Each entry is an LOD0 block (32 raw tokens, cost 32) or a gist of some level ``l >= 1`` (cost 1, covering ``32 **
l`` tokens: LOD1 32, LOD2 1,024, LOD3 32,768, ...; levels above 2 appear only when the history has outgrown what
LOD0-2 can tile within ``w_max``). The tiling is held as tensors (:class:`~megacontext.wc.tiling.EntryState`) and
every operation is a pure vectorised function from :mod:`megacontext.wc.tiling` / :mod:`megacontext.wc.allocator`;
:class:`WorkingContext` is a thin stateful wrapper that also knows the history length, the config and the step
counter.
Invariants (checked by :func:`check_invariants`, which the engine runs in debug mode): time-ordered,
gap-free, block-aligned, level-consistent tiling of the complete blocks; the partial tail and every block
touching the most recent ``recent_raw`` tokens are raw; total cost <= ``w_max``.

Every mutation is atomic: it computes the new tiling first and swaps it in only when legal, so a raised
:class:`IllegalActionError` or :class:`BudgetError` leaves the WC exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, MAX_LEVEL, cost_tensor, entry_bounds
from megacontext.tree.history import HistorySource
from megacontext.wc.allocator import AllocatorConfig, StepTelemetry, allocate
from megacontext.wc.materialize import Materialized, materialize_tiling
from megacontext.wc.tiling import (
    ACTION_COST,
    BudgetError,
    EntryState,
    IllegalActionError,
    InvariantError,
    WorkingContextError,
    apply_actions,
    check_tiling,
    collapse_by_recency,
    first_overflow,
    first_protected_block,
    min_cost,
    min_cost_tensor,
    min_w_max,
    raw_first_tiling,
    sibling_runs,
)

log = logging.getLogger(__name__)

STATE_KEYS = ("levels", "indices", "born", "origin", "num_tokens", "wc_step")  # WorkingContext.state_dict()

__all__ = [
    "BudgetError", "IllegalActionError", "InvariantError", "Materialized", "WorkingContext",
    "WorkingContextConfig", "WorkingContextError", "check_invariants",
]


@dataclass
class WorkingContextConfig(Config):
    w_max: int = 1024  # slot budget of the base model's input
    recent_raw: int = 128  # the most recent tokens are always raw (their blocks stay LOD0)
    # RoPE positions of the slots. absolute: a token keeps its stream position and a gist sits at the centre
    # of its span; compact: slots are numbered 0..T-1, so no distance exceeds the native window
    position_mode: Literal["absolute", "compact"] = "absolute"
    # how the budget is kept when the history outgrows it. spread: collapse oldest-first only as far as needed
    # (most of a long history ends at LOD1, little raw text); raw_first: rebuild with the longest raw suffix and
    # everything older at the coarsest level, dropping focus expansions (suits recency-only runs, benchmarks)
    recency: Literal["spread", "raw_first"] = "spread"

    def __post_init__(self):
        check(self.recency in ("spread", "raw_first"), f"recency={self.recency!r}; expected 'spread' or 'raw_first'")
        check(self.recent_raw >= 0, f"recent_raw={self.recent_raw} must be >= 0")
        # recent_raw + 32 is not enough: a mid-block protected boundary, a partial tail and the LOD1 gists
        # of a history not yet 1,024 tokens long add up to ~60 slots (see tiling.min_w_max)
        floor = min_w_max(self.recent_raw)
        check(self.w_max >= floor,
              f"w_max={self.w_max} is too small for recent_raw={self.recent_raw}: need w_max >= {floor} "
              "(protected recent blocks, up to 31 tail tokens and the gists of the first 1,024 tokens), "
              "or lower recent_raw")
        check(self.position_mode in ("absolute", "compact"),
              f"position_mode={self.position_mode!r}; expected 'absolute' or 'compact'")


class WorkingContext:
    """A working context over a history of ``num_tokens`` tokens. Entry ``e`` is addressed by its
    position in time order; ``levels[e]``/``indices[e]`` give its LOD and index at that level."""

    def __init__(self, cfg: WorkingContextConfig | None = None, device: torch.device | str | None = None):
        self.cfg = cfg or WorkingContextConfig()
        self.state = EntryState.empty(device)
        self.num_tokens = 0
        self.step = 0
        self._cost: int | None = 0

    @classmethod
    def from_state(cls, cfg: WorkingContextConfig, state: EntryState, num_tokens: int, step: int = 0,
                   device: torch.device | str | None = None) -> WorkingContext:
        """Restore a saved tiling (e.g. from a store) over a history of ``num_tokens`` tokens.

        The tiling is validated with :func:`check_invariants`; an illegal one raises the specific
        :class:`InvariantError` and no working context is returned."""
        if num_tokens < 0 or step < 0:
            raise WorkingContextError(f"num_tokens={num_tokens} and step={step} must both be >= 0")
        fields = [torch.as_tensor(t, device=device).long() for t in state.fields()]
        wc = cls(cfg, fields[0].device)
        wc.state, wc.num_tokens, wc.step, wc._cost = EntryState(*fields), num_tokens, step, None
        check_invariants(wc)
        return wc

    @classmethod
    def from_state_dict(cls, cfg: WorkingContextConfig, tensors: dict[str, Tensor],
                        device: torch.device | str | None = None) -> WorkingContext:
        """Inverse of :meth:`state_dict`; a missing tensor or an illegal tiling raises WorkingContextError."""
        missing = sorted(set(STATE_KEYS) - set(tensors))
        if missing:
            raise WorkingContextError(f"working-context state lacks tensor(s) {missing}")
        state = EntryState(*(tensors[k] for k in STATE_KEYS[:4]))
        return cls.from_state(cfg, state, int(tensors["num_tokens"][0]), int(tensors["wc_step"][0]), device)

    def state_dict(self) -> dict[str, Tensor]:
        """The tiling and its counters as contiguous CPU tensors (keys :data:`STATE_KEYS`), e.g. to save."""
        fields = dict(zip(STATE_KEYS[:4], self.state.fields(), strict=True))
        out = {**fields, "num_tokens": torch.tensor([self.num_tokens]), "wc_step": torch.tensor([self.step])}
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def assemble(cls, num_tokens: int, cfg: WorkingContextConfig | None = None,
                 device: torch.device | str | None = None) -> WorkingContext:
        """Initial assembly by recency: newest raw, older LOD1, oldest LOD2, filling but never exceeding w_max."""
        wc = cls(cfg, device)
        wc.sync(num_tokens)
        return wc

    # ------------------------------------------------------------------ views
    @property
    def levels(self) -> Tensor:
        return self.state.levels

    @property
    def indices(self) -> Tensor:
        return self.state.indices

    @property
    def device(self) -> torch.device:
        return self.state.levels.device

    def __len__(self) -> int:
        return len(self.state)

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // BLOCK

    @property
    def tail_len(self) -> int:
        return self.num_tokens % BLOCK

    @property
    def protected_from(self) -> int:
        """First block that must stay LOD0."""
        return first_protected_block(self.num_tokens, self.cfg.recent_raw)

    @property
    def reach(self) -> int:
        """Longest history this configuration can tile: every history up to it fits ``w_max`` (at the default
        ``W_max`` = 1,024 and ``recent_raw`` = 128 this is beyond 10^14 tokens)."""
        return first_overflow(self.cfg.w_max, self.cfg.recent_raw) - 1

    def check_room(self, num_tokens: int, visited: Tensor | None = None) -> None:
        """Raise :class:`BudgetError` unless :meth:`sync` is certain to succeed on the way to ``num_tokens``
        tokens: every history length in ``visited`` (int64 [n], the lengths the caller will sync to; default:
        every length up to ``num_tokens``) must have a tiling within ``w_max``. Changes nothing: callers check
        before they write. O(1) while the lengths stay within :attr:`reach`, else O(len(visited))."""
        if num_tokens <= self.reach:
            return
        cfg = self.cfg
        reach = f"; every history up to {self.reach:,} tokens fits"
        if visited is not None:
            cost = min_cost_tensor(visited.long(), cfg.recent_raw)
            if bool((cost <= cfg.w_max).all()):
                return
            num_tokens, reach = int(visited[(cost > cfg.w_max).nonzero()[0, 0]]), ""
        raise BudgetError(
            f"a history of {num_tokens:,} tokens does not fit w_max={cfg.w_max} with recent_raw={cfg.recent_raw} "
            f"(its coarsest tiling costs {min_cost(num_tokens, cfg.recent_raw)} slots){reach}")

    @property
    def cost(self) -> int:
        """Slots the base model reads: 32 per LOD0 block, 1 per gist, plus the raw tail."""
        if self._cost is None:
            self._cost = int(cost_tensor(self.levels).sum()) + self.tail_len
        return self._cost

    def spans(self) -> tuple[Tensor, Tensor]:
        """Token spans [start, end) of every entry, two [E] tensors."""
        return entry_bounds(self.levels, self.indices)

    def clone(self) -> WorkingContext:
        wc = WorkingContext(self.cfg, self.device)
        wc.state, wc.num_tokens, wc.step, wc._cost = self.state, self.num_tokens, self.step, self._cost
        return wc  # EntryState tensors are never mutated in place, so sharing them is safe

    def __repr__(self) -> str:
        top = max(int(self.levels.max()) if len(self) else 0, 2)
        counts = torch.bincount(self.levels, minlength=top + 1).tolist()
        names = "/".join(str(i) for i in range(top + 1))
        return (f"WorkingContext(tokens={self.num_tokens}, entries={len(self)} (LOD{names}={counts}), "
                f"tail={self.tail_len}, cost={self.cost}/{self.cfg.w_max}, step={self.step})")

    def _swap(self, state: EntryState, num_tokens: int | None = None) -> None:
        self.state = state
        if num_tokens is not None:
            self.num_tokens = num_tokens
        self._cost = None

    # ------------------------------------------------------------------ recency policy
    def sync(self, num_tokens: int) -> None:
        """Bring the WC up to a history of ``num_tokens`` tokens: new complete blocks enter as LOD0, the tail
        grows, and if the budget breaks, room is made by recency (``collapse_by_recency``, or a fresh
        ``raw_first_tiling`` with ``recency="raw_first"``)."""
        if num_tokens < self.num_tokens:
            raise WorkingContextError(f"num_tokens={num_tokens} is shorter than the history already held "
                                      f"({self.num_tokens}); histories only grow")
        old_blocks, new_blocks = self.num_blocks, num_tokens // BLOCK
        state = self.state
        if new_blocks > old_blocks:
            fresh = torch.arange(old_blocks, new_blocks, device=self.device)
            zeros = torch.zeros_like(fresh)
            state = state.cat(EntryState(zeros, fresh, torch.full_like(fresh, self.step), zeros.clone()))
        grown = self.cost + (num_tokens - self.num_tokens)  # new LOD0 blocks and tail cost one slot per token
        if grown > self.cfg.w_max:
            # raises BudgetError before any change when even the coarsest tiling cannot fit
            if self.cfg.recency == "raw_first":
                state = raw_first_tiling(num_tokens, self.cfg.recent_raw, self.cfg.w_max, self.step, self.device)
            else:
                state = collapse_by_recency(state, num_tokens, self.cfg.recent_raw, self.cfg.w_max, self.step)
        self._swap(state, num_tokens)
        if grown <= self.cfg.w_max:
            self._cost = grown

    # ------------------------------------------------------------------ explicit actions
    def _entry(self, entry: int) -> tuple[int, int]:
        if not -len(self) <= entry < len(self):
            raise IllegalActionError(f"entry={entry} is out of range; the WC has {len(self)} entries")
        entry %= len(self)
        return entry, int(self.levels[entry])

    def expand(self, entry: int) -> None:
        """LOD``l`` -> its 32 LOD``l-1`` children (l >= 2), LOD1 -> its 32 raw tokens. Raises IllegalActionError on
        LOD0 or when the budget cannot take the extra 31 slots."""
        e, lvl = self._entry(entry)
        if lvl == 0:
            raise IllegalActionError(f"entry {e} is an LOD0 block (index {int(self.indices[e])}); it has no "
                                     "finer level to expand to")
        if self.cost + ACTION_COST > self.cfg.w_max:
            raise IllegalActionError(f"expanding entry {e} needs {ACTION_COST} more slots: cost would be "
                                     f"{self.cost + ACTION_COST} > w_max={self.cfg.w_max}; collapse something first")
        mask = torch.zeros(len(self), dtype=torch.bool, device=self.device)
        mask[e] = True
        grown = len(self) + (ACTION_COST if lvl >= 2 else 0)  # LOD2+ -> 32 entries
        self._swap(apply_actions(self.state, mask, torch.zeros_like(mask), self.step, num_out=grown))

    def collapse(self, entry: int) -> None:
        """LOD0 block -> its LOD1 gist; an LOD``l`` gist -> its LOD``l+1`` parent, which needs all 32 siblings
        present as LOD``l`` entries (``entry`` may name any of them). Protected recent blocks never collapse."""
        e, lvl = self._entry(entry)
        idx = int(self.indices[e])
        if lvl == MAX_LEVEL:
            raise IllegalActionError(f"entry {e} is an LOD{lvl} gist (index {idx}); there is no coarser level")
        fp = self.protected_from
        if lvl == 0:
            if idx >= fp:
                raise IllegalActionError(f"entry {e} (block {idx}) is inside the protected recent "
                                         f"{self.cfg.recent_raw} tokens (blocks >= {fp}); it must stay raw")
            start = e
        else:
            start = e - idx % BLOCK
            if start < 0 or not bool(sibling_runs(self.levels, self.indices, fp)[start]):
                raise IllegalActionError(
                    f"entry {e} (LOD{lvl} index {idx}) cannot collapse: its parent LOD{lvl + 1} {idx // BLOCK} needs "
                    f"all 32 siblings {idx - idx % BLOCK}..{idx - idx % BLOCK + BLOCK - 1} present as LOD{lvl} and "
                    f"below the protected blocks (>= {fp})")
        mask = torch.zeros(len(self), dtype=torch.bool, device=self.device)
        mask[start] = True
        shrunk = len(self) - (ACTION_COST if lvl >= 1 else 0)  # 32 gist entries -> 1
        self._swap(apply_actions(self.state, torch.zeros_like(mask), mask, self.step, num_out=shrunk))

    # ------------------------------------------------------------------ focus
    def refocus(self, scores: Tensor, allocator_cfg: AllocatorConfig | None = None,
                targets: Tensor | None = None) -> StepTelemetry:
        """One allocator step from LensNet scores [E] (positive = expand); advances the step counter.
        ``targets`` [E] (optional): target blocks of multi-level moves (:mod:`megacontext.wc.allocator`)."""
        new, tel = allocate(scores, self.state, w_max=self.cfg.w_max, tail_cost=self.tail_len,
                            protected_from=self.protected_from, step=self.step, cfg=allocator_cfg or AllocatorConfig(),
                            targets=targets)
        self._swap(new)
        self.step += 1
        return tel

    # ------------------------------------------------------------------ model input
    def materialize(self, source: HistorySource, embed: Callable[[Tensor], Tensor]) -> Materialized:
        """inputs_embeds [T, d], position_ids [T] and the entry <-> slot map (see megacontext.wc.materialize)."""
        return materialize_tiling(self.levels, self.indices, self.num_tokens, source, embed,
                                  self.cfg.position_mode)


def check_invariants(wc: WorkingContext) -> None:
    """Raise :class:`InvariantError` naming the first broken tiling invariant of ``wc``."""
    check_tiling(wc.state, wc.num_tokens, wc.cfg.recent_raw, wc.cfg.w_max)
    if wc._cost is not None and wc._cost != int(cost_tensor(wc.levels).sum()) + wc.tail_len:
        raise InvariantError(f"cached cost {wc._cost} disagrees with the tiling")
