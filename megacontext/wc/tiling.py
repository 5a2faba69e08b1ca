"""Working-context tilings as tensors: pure, vectorised functions shared by the WC and the allocator.

A tiling is an :class:`EntryState`: per-entry ``levels [E]`` and ``indices [E]`` (the index at that
level, see :mod:`megacontext.core.lod`) plus bookkeeping ``born [E]`` (step at which the entry took its
current level) and ``origin [E]`` (how it got there: by an expansion, a collapse, or neither).

Invariants of a legal tiling over a history of ``N`` tokens (``B = N // 32`` complete blocks):
- entries are in time order and tile ``[0, 32 * B)`` without gaps or overlaps; the partial tail
  ``[32 * B, N)`` is not an entry, it is always raw;
- levels are 0..``max_level`` (default :data:`~megacontext.core.lod.MAX_LEVEL`); spans are block-aligned by
  construction of ``(level, index)`` addressing, and a gist only ever covers a complete span because the
  tiling ends at ``32 * B``;
- every block overlapping the most recent ``recent_raw`` tokens is LOD0 ("protected");
- cost (32 per LOD0 block, 1 per gist, plus the tail length) never exceeds ``w_max``.

Design choice: every legal action changes the cost by exactly 31 slots (LOD1 -> LOD0 and LOD``l`` -> 32
LOD``l-1`` both add 31; the inverse collapses free 31), so budget bookkeeping reduces to counting actions.

Depth: levels above LOD2 are used only when the levels below no longer fit (the recency collapse merges
runs level by level, oldest first; the raw-first tiling tries top level 2 before 3, ...), so histories that
fit two levels tile exactly as they did before LOD3 existed. The cheapest tiling costs the protected raw
suffix plus the base-32 digit sum of the older blocks (:func:`~megacontext.core.lod.coarsest_cost`), so a
budget ``w_max`` reaches about ``32 ** ((w_max - recent_raw - 31) / 31)`` blocks (:func:`reach`):
astronomically far for any practical budget, though not for one at the floor :func:`min_w_max`.
Rebuilding after a set of actions is one :func:`~megacontext.core.lod.segment_ids` call: the new entry
count decides tensor sizes, so it must reach the host once; callers that know it from the action counts
pass it in and avoid even that sync. ``segment_ids`` replaces ``torch.repeat_interleave``, which (with or
without ``output_size``) costs 15-20 ms per call on a loaded CPU waking its intra-op thread pool; the
cumsum-of-markers form takes tens of microseconds and never syncs on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.core.lod import (
    BLOCK,
    MAX_LEVEL,
    coarsest_cost,
    coarsest_cost_tensor,
    coarsest_counts,
    cost_tensor,
    entry_bounds,
    segment_ids,
    smallest_with_cost,
    span,
    span_tensor,
)

ACTION_COST = BLOCK - 1  # slots added by any expansion, freed by any collapse
UNCHANGED, EXPANDED, COLLAPSED = 0, 1, -1  # values of EntryState.origin


class WorkingContextError(ValueError):
    """Base class of working-context errors."""


class IllegalActionError(WorkingContextError):
    """An expand/collapse request is not legal for the current tiling; the WC was left unchanged."""


class BudgetError(WorkingContextError):
    """The history cannot be represented within ``w_max`` even at the coarsest legal tiling."""


class InvariantError(WorkingContextError):
    """A tiling violates a working-context invariant (a bug, reported by :func:`check_tiling`)."""


@dataclass(frozen=True)
class EntryState:
    """One tiling: four aligned int64 tensors of shape [E] on one device."""

    levels: Tensor
    indices: Tensor
    born: Tensor
    origin: Tensor

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> EntryState:
        z = torch.zeros(0, dtype=torch.long, device=device)
        return cls(z, z.clone(), z.clone(), z.clone())

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    def cat(self, other: EntryState) -> EntryState:
        return EntryState(*(torch.cat([a, b]) for a, b in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.levels, self.indices, self.born, self.origin


def first_protected_block(num_tokens: int, recent_raw: int) -> int:
    """Index of the oldest block overlapping the most recent ``recent_raw`` tokens (blocks from here on
    must stay LOD0). Equals ``num_tokens // 32`` when only the tail is recent."""
    return max(num_tokens - recent_raw, 0) // BLOCK


def min_cost(num_tokens: int, recent_raw: int, max_level: int = MAX_LEVEL) -> int:
    """Cost of the coarsest legal tiling: the coarsest gap-free tiling of the unprotected blocks (base-32
    digits, levels up to ``max_level``), raw protected blocks and tail."""
    blocks, tail = divmod(num_tokens, BLOCK)
    fp = first_protected_block(num_tokens, recent_raw)
    return coarsest_cost(fp, max_level) + BLOCK * (blocks - fp) + tail


def min_cost_tensor(num_tokens: Tensor, recent_raw: int, max_level: int = MAX_LEVEL) -> Tensor:
    """Vectorised :func:`min_cost` over history lengths [n] (int64) -> [n]."""
    fp = torch.div((num_tokens - recent_raw).clamp(min=0), BLOCK, rounding_mode="floor")
    return coarsest_cost_tensor(fp, max_level) + num_tokens - BLOCK * fp


def min_w_max(recent_raw: int) -> int:
    """Smallest ``w_max`` that survives a growing history until its protected region is complete and one
    more 1,024-token LOD2 span of older history has been gisted (so :func:`reach` >= 1,024).

    It is the largest :func:`min_cost` over histories of up to ``recent_raw + 32 + 1024`` tokens, whose worst
    case is ``recent_raw + 62``: the protected tokens and the partial tail together take up to
    ``recent_raw + 31`` raw slots (a boundary falling mid-block rounds the protected region out to whole
    blocks, the tail adds up to 31), and up to 31 LOD1 gists of older blocks wait for their 32nd sibling
    before merging into one LOD2. A budget at this floor reaches only ~2,048 tokens (one more level of 31
    waiting siblings does not fit); every 31 slots above it add a level, i.e. multiply the reach by 32
    (:func:`reach`)."""
    if recent_raw < 0:
        raise ValueError(f"recent_raw={recent_raw} must be >= 0")
    return recent_raw + 2 * (BLOCK - 1)


def first_overflow(w_max: int, recent_raw: int, max_level: int = MAX_LEVEL) -> int:
    """The shortest history (tokens) whose coarsest legal tiling exceeds ``w_max``; every shorter one fits.

    A history of ``N >= recent_raw`` tokens is ``recent_raw + 32 fp + j`` (``fp`` older blocks, ``j < 32``) and
    costs ``coarsest_cost(fp) + recent_raw + j``. All ``j`` fit while ``coarsest_cost(fp) <= w_max - recent_raw
    - 31``, so the first overflow lies at the smallest ``fp`` past that
    (:func:`~megacontext.core.lod.smallest_with_cost`), at the first ``j`` that no longer fits. O(max_level)."""
    if w_max < recent_raw:  # even an all-raw history shorter than recent_raw overflows
        return w_max + 1
    fp = smallest_with_cost(w_max - recent_raw - (BLOCK - 1) + 1, max_level)
    j = max(0, w_max - recent_raw - coarsest_cost(fp, max_level) + 1)
    return recent_raw + BLOCK * fp + j


def reach(w_max: int, recent_raw: int, max_level: int = MAX_LEVEL) -> int:
    """Longest history (tokens, a multiple of 1,024) such that every history up to it fits ``w_max`` slots."""
    top = span(2)
    return (first_overflow(w_max, recent_raw, max_level) - 1) // top * top


def budget_error(num_tokens: int, recent_raw: int, w_max: int, max_level: int = MAX_LEVEL) -> BudgetError:
    need = min_cost(num_tokens, recent_raw, max_level)
    return BudgetError(
        f"a history of {num_tokens} tokens does not fit w_max={w_max} with recent_raw={recent_raw}: its coarsest "
        f"legal tiling costs {need} slots (a working context needs w_max >= {need}, or a smaller recent_raw)")


def windowed_sum(x: Tensor, width: int = BLOCK) -> Tensor:
    """out[e] = x[e] + ... + x[e + width - 1] along dim 0 (entries past the end count as 0). [E, ...] -> [E, ...]."""
    n = x.shape[0]
    zero = x.new_zeros((1, *x.shape[1:]))
    csum = torch.cat([zero, torch.cumsum(x, 0)])  # [E + 1, ...]
    csum = torch.cat([csum, csum[-1:].expand(width, *x.shape[1:])])  # [E + 1 + width, ...]
    return csum[width:width + n] - csum[:n]


def sibling_runs(levels: Tensor, indices: Tensor, limit_block: int, max_level: int = MAX_LEVEL) -> Tensor:
    """Bool [E]: entry e starts a complete run of 32 siblings at one gist level ``l < max_level`` (the children of
    one LOD``l+1`` parent) whose blocks all lie below ``limit_block``. In a legal tiling, 32 consecutive
    entries of level ``l`` starting at an index that is a multiple of 32 are exactly the children of one parent,
    so a windowed count of same-level entries suffices."""
    top = max(int(max_level), 1)
    onehot = torch.nn.functional.one_hot(levels.clamp(0, top), top + 1)  # [E, top + 1]
    same = windowed_sum(onehot).gather(1, levels.clamp(0, top)[:, None])[:, 0]  # [E] same-level entries ahead
    run_blocks = indices * span_tensor(levels) // BLOCK + span_tensor(levels)  # end block of the parent's span
    return (same == BLOCK) & (indices % BLOCK == 0) & (levels >= 1) & (levels < max_level) \
        & (run_blocks <= limit_block)


def group_members(starts: Tensor) -> Tensor:
    """Bool [E]: entries inside a 32-entry run that begins at a True of ``starts`` (start included)."""
    csum = torch.cumsum(starts.long(), 0)
    lagged = torch.nn.functional.pad(csum, (BLOCK, 0))[: starts.shape[0]]
    return (csum - lagged) > 0


def changed_blocks(levels: Tensor, expand: Tensor, collapse: Tensor) -> Tensor:
    """0-dim count of 32-token blocks whose representation an action set changes."""
    per_entry = span_tensor(levels) // BLOCK  # blocks under one entry (an LOD2 expand touches 32)
    blocks_touched = torch.where(collapse & (levels >= 1), per_entry * BLOCK, per_entry)  # a run: 32 entries
    return ((expand | collapse).long() * blocks_touched).sum()


def apply_actions(state: EntryState, expand: Tensor, collapse: Tensor, step: int,
                  mark: bool = True, num_out: int | None = None) -> EntryState:
    """Rebuild a tiling after a set of actions (masks over the current entries).

    ``expand[e]``: LOD``l`` (l >= 2) -> its 32 LOD``l-1`` children, LOD1 -> its LOD0 block. ``collapse[e]``: LOD0 ->
    its LOD1 gist, or, on the first of 32 LOD``l`` siblings, the whole run -> their LOD``l+1`` parent. Masks are
    assumed legal and disjoint (callers check). ``mark=False`` records the change as policy-driven (no cooldown).
    ``num_out`` is the new entry count when the caller already knows it (``len(state)`` + 31 per expansion of a
    level >= 2 - 31 per run collapse); otherwise it is computed here with one host sync."""
    lv, ix = state.levels, state.indices
    exp2, exp1 = expand & (lv >= 2), expand & (lv == 1)
    col0, colg = collapse & (lv == 0), collapse & (lv >= 1)
    swallowed = group_members(colg) & ~colg  # later siblings vanish into the run's first entry

    n_out = torch.where(exp2, BLOCK, 1)
    n_out = torch.where(swallowed, 0, n_out)  # [E]
    new_lv = lv - exp2.long() - exp1.long() + col0.long() + colg.long()
    base_ix = torch.where(exp2, ix * BLOCK, torch.where(colg, ix // BLOCK, ix))
    changed = exp2 | exp1 | col0 | colg
    new_born = torch.where(changed, step, state.born)
    tag = torch.where(expand, EXPANDED, torch.where(collapse, COLLAPSED, state.origin)) if mark else \
        torch.where(changed, UNCHANGED, state.origin)

    if num_out is None:
        num_out = int(n_out.sum())  # the one host sync: the new entry count decides tensor sizes
    src = segment_ids(n_out, num_out)  # [E'] source entry of each new entry
    first_out = torch.cumsum(n_out, 0) - n_out
    offset = torch.arange(num_out, device=lv.device) - first_out[src]
    return EntryState(new_lv[src], base_ix[src] + offset, new_born[src], tag[src])


def collapse_by_recency(state: EntryState, num_tokens: int, recent_raw: int, w_max: int, step: int,
                        max_level: int = MAX_LEVEL) -> EntryState:
    """The recency policy: make a tiling fit ``w_max`` by collapsing the oldest unprotected LOD0 blocks to
    LOD1, then (if still over) the oldest complete runs of 32 LOD1 siblings to LOD2, then runs of LOD2 to
    LOD3, ... up to ``max_level``. Stops as soon as it fits, so the result leaves fewer than 31 slots unused
    whenever it had to collapse anything, and a level is only reached for when the ones below are exhausted.

    Raises :class:`BudgetError` (before touching anything) if even the coarsest tiling does not fit."""
    if min_cost(num_tokens, recent_raw, max_level) > w_max:
        raise budget_error(num_tokens, recent_raw, w_max, max_level)
    tail = num_tokens % BLOCK
    fp = first_protected_block(num_tokens, recent_raw)
    excess = int(cost_tensor(state.levels).sum()) + tail - w_max
    for stage in range(max_level):
        if excess <= 0:
            break
        lv, ix = state.levels, state.indices
        cand = (lv == 0) & (ix < fp) if stage == 0 else sibling_runs(lv, ix, fp, max_level) & (lv == stage)
        need = -(-excess // ACTION_COST)
        take = cand & (torch.cumsum(cand.long(), 0) <= need)  # oldest first
        taken = int(take.sum())
        if not taken:
            continue
        none = torch.zeros_like(take)
        # a block collapse keeps the entry count, a run collapse removes 31 entries
        num_out = len(state) - (taken * ACTION_COST if stage >= 1 else 0)
        state = apply_actions(state, none, take, step, mark=False, num_out=num_out)
        excess -= taken * ACTION_COST
    if excess > 0:  # unreachable when min_cost is right; keep the guarantee explicit
        raise InvariantError(f"recency policy left the tiling {excess} slots over w_max={w_max}")
    return state


def raw_first_tiling(num_tokens: int, recent_raw: int, w_max: int, step: int = 0,
                     device: torch.device | str | None = None, max_level: int = MAX_LEVEL) -> EntryState:
    """The "raw first" recency tiling, built from scratch: the longest raw suffix that fits, everything older
    at the coarsest legal level (complete 1,024-token spans as LOD2, the blocks between the last such span and
    the raw suffix as LOD1). Compare :func:`collapse_by_recency`, which collapses only as far as needed and so
    leaves most of a long history at LOD1 with little raw text.

    With a split at block ``s`` (blocks ``[s, B)`` raw) and top level ``L`` the cost is the base-32 digit sum
    of ``s`` (:func:`~megacontext.core.lod.coarsest_cost`) ``+ 32 (B - s) + tail``, strictly decreasing in
    ``s``; the smallest feasible ``s`` (most raw text) is chosen among ``s <= fp`` (the protected blocks stay
    raw). ``L`` is 2 unless even ``s = fp`` does not fit, then 3, ... up to ``max_level``, so a history that
    two levels hold tiles as it always did. Raises :class:`BudgetError` when nothing fits."""
    blocks, tail = divmod(num_tokens, BLOCK)
    fp = first_protected_block(num_tokens, recent_raw)
    split = torch.arange(fp + 1)  # candidate splits [fp + 1]
    for top in range(min(2, max_level), max_level + 1):
        cost = coarsest_cost_tensor(split, top) + BLOCK * (blocks - split) + tail
        fits = cost <= w_max
        if bool(fits[-1]):
            break
    else:
        raise budget_error(num_tokens, recent_raw, w_max, max_level)
    s = int(fits.int().argmax())  # first feasible split: cost is decreasing, so this keeps the most raw text
    levels, indices, at = [], [], 0  # at: blocks covered so far
    for level in range(top, 0, -1):  # the coarsest entries first: time order
        n = coarsest_counts(s, top)[level - 1]
        per = BLOCK ** (level - 1)  # blocks per entry
        levels.append(torch.full((n,), level))
        indices.append(torch.arange(at // per, at // per + n))
        at += n * per
    levels.append(torch.zeros(blocks - s, dtype=torch.long))
    indices.append(torch.arange(s, blocks))
    lv, ix = torch.cat(levels).to(device), torch.cat(indices).to(device)
    return EntryState(lv, ix, torch.full_like(lv, step), torch.zeros_like(lv))


def check_tiling(state: EntryState, num_tokens: int, recent_raw: int, w_max: int, max_level: int = MAX_LEVEL) -> None:
    """Raise :class:`InvariantError` naming the first violated invariant (see module docstring)."""
    lv, ix = state.levels, state.indices
    sizes = {t.shape for t in state.fields()}
    if len(sizes) != 1 or lv.dim() != 1:
        raise InvariantError(f"entry tensors must be aligned 1-D tensors, got shapes {sorted(map(tuple, sizes))}")
    if ((lv < 0) | (lv > max_level)).any():
        raise InvariantError(f"levels must lie in 0..{max_level}; got {sorted(set(lv.tolist()))}")
    if (ix < 0).any():
        raise InvariantError("entry indices must be non-negative")
    blocks, tail = divmod(num_tokens, BLOCK)
    start, end = entry_bounds(lv, ix)
    covered = int(end[-1]) if lv.numel() else 0
    if lv.numel() and int(start[0]) != 0:
        raise InvariantError(f"the first entry starts at token {int(start[0])}, expected 0")
    gaps = (start[1:] != end[:-1]).nonzero()
    if gaps.numel():
        e = int(gaps[0])
        raise InvariantError(f"entries {e} and {e + 1} do not abut: [{int(start[e])}, {int(end[e])}) then "
                             f"[{int(start[e + 1])}, {int(end[e + 1])})")
    if covered != blocks * BLOCK:
        raise InvariantError(f"entries cover [0, {covered}) but the history has {blocks} complete blocks "
                             f"({blocks * BLOCK} tokens, tail {tail})")
    fp = first_protected_block(num_tokens, recent_raw)
    bad = ((lv != 0) & (end > fp * BLOCK)).nonzero()
    if bad.numel():
        e = int(bad[0])
        raise InvariantError(f"entry {e} (LOD{int(lv[e])} index {int(ix[e])}) overlaps the protected recent "
                             f"{recent_raw} tokens (from token {fp * BLOCK}) but is not raw")
    total = int(cost_tensor(lv).sum()) + tail
    if total > w_max:
        raise InvariantError(f"working-context cost {total} exceeds w_max={w_max}")
