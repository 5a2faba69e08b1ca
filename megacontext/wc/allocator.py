"""Focus Allocator: turn one signed score per working-context entry into legal, budgeted actions.

Scores: positive = the entry wants more detail (expand), negative = it can lose detail (collapse).

Policy (greedy by priority, pure tensor code, one host sync for the rebuild):
- Expansion candidates: gists (any level >= 1) with ``score > tau_expand``, best first.
- Collapse candidates: unprotected LOD0 blocks (score = their own) and complete runs of 32 siblings of one
  gist level (score = mean of the run), worst first. A member's expansion is dropped when its run is collapsed, which
  only frees budget, so the step stays legal.
  Collapses with ``score < -tau_collapse`` are *voluntary*; weaker ones are only used to *pay* for an
  expansion, and only when the expansion's score beats theirs by ``swap_margin``.
- Every action moves the cost by exactly 31 slots, so the j-th expansion needs ``max(0, j - free)``
  paying collapses, where ``free = (w_max - cost) // 31``. Because expansions are sorted descending and
  collapses ascending, the feasible expansions form a prefix: their count is a cumulative product.
- At most ``n_diff`` actions per step; expansions (with the collapses that pay for them) come first,
  the remaining allowance goes to voluntary collapses. The budget therefore holds after every step.
- Cooldown: an entry made by an expansion may not be collapsed, and one made by a collapse may not be
  expanded, until ``cooldown`` steps have passed. This stops flip-flop on alternating scores while still
  letting a freshly expanded region zoom in further.
- Protected recent blocks are LOD0 and never collapse candidates.
- Multi-level moves: a policy may name a *target block* per entry (``targets [E]``, -1 = none; e.g. the best
  lexical match under a gist's span). A gist of level ``l >= 2`` whose score exceeds ``tau_deep`` and whose
  target lies in its span is expanded straight down to ``deep_to`` along the path to that block in the same
  step: LOD2 -> its 32 LOD1 children, then the child holding the target -> raw. That is ``l - deep_to``
  actions of 31 slots each, so the prefix rule above generalises by counting actions instead of expansions
  (the j-th expansion needs ``max(0, A_j - free)`` payers, ``A_j`` the cumulative actions); ``n_diff`` caps
  actions, and the intermediate entries count as made by an expansion for the cooldown. Without targets (or
  with ``deep=False``) every expansion is one action and the step is exactly the single-level one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from megacontext.core.config import Config, check
from megacontext.core.lod import BLOCK, MAX_LEVEL, cost_tensor, entry_bounds, span_tensor
from megacontext.wc.tiling import (
    ACTION_COST,
    COLLAPSED,
    EXPANDED,
    EntryState,
    apply_actions,
    changed_blocks,
    group_members,
    sibling_runs,
    windowed_sum,
)


@dataclass
class AllocatorConfig(Config):
    tau_expand: float = 0.1  # expand only when score > tau_expand
    tau_collapse: float = 0.1  # voluntary collapse when score < -tau_collapse
    swap_margin: float = 0.2  # a paying collapse needs score < (score of the expansion it pays for) - margin
    n_diff: int = 32  # most actions (expansions + collapses) per step
    cooldown: int = 4  # steps before an entry's last change may be reversed
    deep: bool = True  # multi-level moves for entries the policy names a target block for (see docstring)
    tau_deep: float = 1.0  # ...when the entry's score exceeds this
    deep_to: int = 0  # ...down to this level (0 = raw)

    def __post_init__(self):
        check(self.tau_expand >= 0, f"tau_expand={self.tau_expand} must be >= 0")
        check(self.tau_collapse >= 0, f"tau_collapse={self.tau_collapse} must be >= 0")
        check(self.swap_margin >= 0, f"swap_margin={self.swap_margin} must be >= 0")
        check(self.n_diff >= 0, f"n_diff={self.n_diff} must be >= 0")
        check(self.cooldown >= 0, f"cooldown={self.cooldown} must be >= 0")
        check(self.tau_deep >= self.tau_expand, f"tau_deep={self.tau_deep} must be >= tau_expand={self.tau_expand}")
        check(0 <= self.deep_to <= 1, f"deep_to={self.deep_to}; expected 0 (raw) or 1")


@dataclass
class StepTelemetry:
    """What one allocator step did. Tensor fields are 0-dim and stay on the device (no sync);
    :meth:`as_dict` converts them for logging. The derived statistics (``swap_rate``, ``utilisation``,
    ``residency_changed``, ``residency_by_level``) are computed on first access from the step's inputs and
    outputs, so a caller that only counts actions (the engine, every focus round) pays nothing for them."""

    expand: Tensor  # [E_before] bool: entries expanded this step
    collapse: Tensor  # [E_before] bool: LOD0 blocks collapsed, or first entries of merged LOD1 runs
    levels_before: Tensor  # [E_before]
    indices_before: Tensor  # [E_before]
    n_expand: Tensor
    n_collapse: Tensor
    n_deep: Tensor  # extra expansions made by multi-level moves (beyond the first level of each)
    born_before: Tensor  # [E_before] the step each entry took its level, before this step
    after: EntryState  # the tiling after the step
    step: int
    w_max: int
    tail_cost: int

    @cached_property
    def swap_rate(self) -> Tensor:
        """Changed 32-token blocks / complete blocks."""
        lv = self.levels_before
        blocks = (span_tensor(lv) // BLOCK).sum().clamp(min=1)
        return changed_blocks(lv, self.expand, self.collapse) / blocks

    @cached_property
    def utilisation(self) -> Tensor:
        """Cost after the step / w_max."""
        cost_before = cost_tensor(self.levels_before).sum() + self.tail_cost
        return (cost_before + ACTION_COST * (self.n_expand + self.n_deep - self.n_collapse)) / self.w_max

    @cached_property
    def residency_changed(self) -> Tensor:
        """Mean steps the changed entries had spent at their level (nan if none changed, by design)."""
        changed = self.expand | self.collapse
        age = (self.step - self.born_before).float()
        return (age * changed).sum() / changed.sum()

    @cached_property
    def residency_by_level(self) -> Tensor:
        """[MAX_LEVEL + 1] mean age of the entries at each LOD after the step (nan where absent)."""
        new_age = (self.step - self.after.born).float()
        onehot = torch.nn.functional.one_hot(self.after.levels, MAX_LEVEL + 1).float()  # [E', MAX_LEVEL + 1]
        return (new_age[:, None] * onehot).sum(0) / onehot.sum(0)

    def actions(self) -> list[tuple[str, int, int]]:
        """(kind, level, index) of every action, in time order (syncs; for logs and tests)."""
        acts = []
        for e in (self.expand | self.collapse).nonzero().flatten().tolist():
            kind = "expand" if bool(self.expand[e]) else "collapse"
            acts.append((kind, int(self.levels_before[e]), int(self.indices_before[e])))
        return acts

    def as_dict(self) -> dict[str, float | list[float]]:
        return {
            "n_expand": int(self.n_expand), "n_collapse": int(self.n_collapse), "n_deep": int(self.n_deep),
            "swap_rate": float(self.swap_rate), "utilisation": float(self.utilisation),
            "residency_changed": float(self.residency_changed),
            "residency_by_level": [float(v) for v in self.residency_by_level],
        }


def _first_k(order: Tensor, k: Tensor) -> Tensor:
    """Bool mask [E] selecting the entries at the first k positions of permutation ``order``."""
    mask = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    return mask.scatter(0, order, torch.arange(order.shape[0], device=order.device) < k)


def deep_depths(scores: Tensor, targets: Tensor | None, levels: Tensor, indices: Tensor,
                cfg: AllocatorConfig) -> Tensor:
    """Actions [E] each entry's expansion would take: ``level - deep_to`` for a strong gist whose target block
    lies in its span (see module docstring), else 1."""
    one = torch.ones_like(levels)
    if targets is None or not cfg.deep:
        return one
    per = torch.where(levels <= 1, 1, BLOCK ** (levels - 1).clamp(min=0))  # blocks under an entry
    t = targets.to(levels.device)
    ok = (levels >= 2) & (scores > cfg.tau_deep) & (t >= indices * per) & (t < (indices + 1) * per)
    return torch.where(ok, (levels - cfg.deep_to).clamp(min=1), one)


def choose_actions(scores: Tensor, state: EntryState, *, w_max: int, tail_cost: int, protected_from: int,
                   step: int, cfg: AllocatorConfig, targets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pure decision: scores [E] -> (expand [E] bool, collapse [E] bool, depth [E] actions per expansion),
    legal and within budget. ``protected_from`` is the first protected block; ``tail_cost`` the raw tail
    length; ``targets`` optional target blocks of multi-level moves. No host sync."""
    lv, ix = state.levels, state.indices
    n = lv.shape[0]
    dev = lv.device
    scores = torch.nan_to_num(scores.to(device=dev, dtype=torch.float32), nan=0.0)  # [E]
    age = step - state.born
    may_expand = ~((state.origin == COLLAPSED) & (age < cfg.cooldown))
    may_collapse = ~((state.origin == EXPANDED) & (age < cfg.cooldown))

    want_expand = (lv > 0) & may_expand & (scores > cfg.tau_expand)  # [E]
    depth = deep_depths(scores, targets, lv, ix, cfg)  # [E] actions per expansion
    solo = (lv == 0) & (ix < protected_from) & may_collapse
    runs = sibling_runs(lv, ix, protected_from)
    run_ok = windowed_sum(may_collapse.long()) == BLOCK
    run_score = windowed_sum(scores) / BLOCK  # mean over the run starting here
    can_collapse = solo | (runs & run_ok)
    col_score = torch.where(lv == 0, scores, run_score)

    inf = torch.tensor(float("inf"), device=dev)
    x_sorted, x_order = torch.sort(torch.where(want_expand, scores, -inf), descending=True)
    c_sorted, c_order = torch.sort(torch.where(can_collapse, col_score, inf))
    n_x, n_c = want_expand.sum(), can_collapse.sum()
    n_vol = (can_collapse & (col_score < -cfg.tau_collapse)).sum()

    cost_now = cost_tensor(lv).sum() + tail_cost
    free = torch.div(w_max - cost_now, ACTION_COST, rounding_mode="floor").clamp(min=0)
    j = torch.arange(1, n + 1, device=dev)  # j-th best expansion
    acts = torch.cumsum(depth[x_order], 0)  # actions of the first j expansions
    need = (acts - free).clamp(min=0)  # paying collapses needed for the first j expansions
    payer = c_sorted[(need - 1).clamp(min=0, max=max(n - 1, 0))] if n else c_sorted
    paid = (need <= n_vol) | (payer < x_sorted - cfg.swap_margin)
    feasible = (j <= n_x) & (need <= n_c) & paid & (acts + need <= cfg.n_diff)
    m = torch.cumprod(feasible.long(), 0).sum()  # feasible expansions form a prefix
    acts_m = (depth[x_order] * (j <= m)).sum()
    need_m = (acts_m - free).clamp(min=0)
    k = torch.maximum(need_m, torch.minimum(n_vol, cfg.n_diff - acts_m))
    expand, collapse = _first_k(x_order, m), _first_k(c_order, k)
    # a run that collapses outvotes its members' expansion wishes; dropping expansions only frees budget
    expand = expand & ~group_members(collapse & (lv >= 1))
    return expand, collapse, torch.where(expand, depth, 0)


def deepen(state: EntryState, targets: Tensor, depth: Tensor, step: int) -> EntryState:
    """After the first level of multi-level moves was applied (giving ``state``), expand the entry holding each
    target block [k] again, ``depth [k] - 1`` more times. One pass per level (a constant bound), no per-entry
    loop; the new entries are marked as made by an expansion."""
    remaining = depth.clone()
    for _ in range(MAX_LEVEL):
        live = remaining > 1
        if not bool(live.any()):  # one host sync per level of descent
            break
        start, _ = entry_bounds(state.levels, state.indices)
        pos = torch.searchsorted(start // BLOCK, targets[live], right=True) - 1  # entry holding each target
        mask = torch.zeros(len(state), dtype=torch.bool, device=state.levels.device).scatter(0, pos, True)
        grow = int((state.levels[mask] >= 2).sum()) * ACTION_COST  # an LOD>=2 expansion adds 31 entries
        state = apply_actions(state, mask, torch.zeros_like(mask), step, num_out=len(state) + grow)
        remaining = remaining - live.long()
    return state


def allocate(scores: Tensor, state: EntryState, *, w_max: int, tail_cost: int, protected_from: int,
             step: int, cfg: AllocatorConfig, targets: Tensor | None = None) -> tuple[EntryState, StepTelemetry]:
    """One focus step: decide, apply atomically, report. Returns (new state, telemetry). ``targets`` [E]
    (optional, -1 = none): the block a multi-level move of each entry should reach (see module docstring).

    The input must already fit ``w_max`` (the WC guarantees it); an over-budget input is never made
    worse, since with no free slots every expansion is paid for by a collapse."""
    if scores.shape != state.levels.shape:
        raise ValueError(f"scores must have shape [E]={tuple(state.levels.shape)} (one per entry), "
                         f"got {tuple(scores.shape)}")
    lv = state.levels
    if targets is not None and targets.shape != lv.shape:
        raise ValueError(f"targets must have shape [E]={tuple(lv.shape)}, got {tuple(targets.shape)}")
    expand, collapse, depth = choose_actions(scores, state, w_max=w_max, tail_cost=tail_cost,
                                             protected_from=protected_from, step=step, cfg=cfg, targets=targets)
    n_expand, n_collapse = expand.sum(), collapse.sum()
    n_deep = (depth - 1).clamp(min=0).sum()
    # one host sync for both: whether anything moves, and the rebuilt tiling's entry count (31 more per
    # expansion of a level >= 2, 31 fewer per run collapse)
    moves, num_out = torch.stack([n_expand + n_collapse, len(state) + ACTION_COST * (
        (expand & (lv >= 2)).sum() - (collapse & (lv >= 1)).sum())]).tolist()
    if moves == 0:  # nothing to do: the rebuild would reproduce the tiling exactly
        new = state
    else:
        new = apply_actions(state, expand, collapse, step, num_out=num_out)
        if targets is not None and cfg.deep:
            deep = depth > 1
            new = deepen(new, targets.to(lv.device)[deep], depth[deep], step)
    tel = StepTelemetry(
        expand=expand, collapse=collapse, levels_before=lv, indices_before=state.indices,
        n_expand=n_expand, n_collapse=n_collapse, n_deep=n_deep, born_before=state.born, after=new, step=step,
        w_max=w_max, tail_cost=tail_cost,
    )
    return new, tel
