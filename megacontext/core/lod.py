"""Span arithmetic of the LOD hierarchy: pure integer/tensor functions, no state.

Levels: LOD0 = raw 32-token blocks, LOD1 = one gist per block (covers 32 tokens), and every level above
summarises 32 entries of the one below: LOD2 covers 1,024 tokens, LOD3 32,768, LOD4 1,048,576, ... An entry
is addressed by ``(level, index)``; its token span is ``[index * span(level), (index + 1) * span(level))``
where ``span(level) = BLOCK ** max(level, 1)`` — an LOD0 *block* and an LOD1 gist cover the same 32 tokens.

Depth: a history uses only the levels it needs (a level exists once it has a complete entry, and a working
context reaches for it only when the levels below no longer fit its budget). :data:`MAX_LEVEL` is a hard
cap that keeps every span far inside int64 arithmetic; at ``W_max`` = 1,024 it is reached past 10^14 tokens.
:data:`NET_LEVELS` is how many gist levels the shipped networks have level embeddings for (LOD1, LOD2);
coarser levels are mean-pooled by the compressors and read as LOD2 by LensNet.

Entry tensors: a tiling's entries are two aligned [E] tensors ``levels`` and ``indices``;
:func:`entry_bounds` gives their token spans and :func:`segment_ids` expands per-entry counts (blocks,
slots) into a per-item entry index, the vectorised step every consumer of a tiling needs.

Coarsest tilings: the cheapest gap-free tiling of the first ``b`` blocks takes, from the top level down, as
many aligned entries of each level as fit: the base-32 digits of ``b`` (the top level takes the whole
quotient). Its cost, :func:`coarsest_cost`, is their sum; it grows like ``31 * log_32(b)`` at worst.

Gist placement (the design default): a gist sits at the centre of its span, ``start + span // 2``,
so its RoPE distance to the following tokens matches the average distance of the tokens it replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32  # tokens per LOD0 block and children per gist; fixed by the design
MAX_LEVEL = 8  # hard cap of the hierarchy (an LOD8 gist covers 32^8 ~ 1.1e12 tokens)
NET_LEVELS = 2  # gist levels with their own level embedding in GistNet / LensNet (LOD1, LOD2)


def check_level_range(level: int, max_level: int = MAX_LEVEL) -> None:
    if not 0 <= level <= max_level:
        raise ValueError(f"level={level} is out of range; expected 0..{max_level}")


def span(level: int) -> int:
    """Tokens covered by one entry of ``level`` (LOD0 block = LOD1 gist = 32, LOD2 = 1024, LOD3 = 32768, ...)."""
    check_level_range(level)
    return BLOCK ** max(level, 1)


def cost(level: int) -> int:
    """Working-context slots used by one entry: a raw block costs 32 tokens, a gist one slot."""
    span(level)  # validates
    return BLOCK if level == 0 else 1


def span_tensor(levels: Tensor) -> Tensor:
    """Vectorised :func:`span`: [E] int levels -> [E] int64 spans."""
    return torch.pow(torch.full_like(levels, BLOCK), levels.clamp(min=1))


def cost_tensor(levels: Tensor) -> Tensor:
    """Vectorised :func:`cost`: [E] int levels -> [E] int64 costs."""
    return torch.where(levels == 0, torch.full_like(levels, BLOCK), torch.ones_like(levels))


def token_span(level: int, index: int) -> tuple[int, int]:
    s = span(level)
    return index * s, (index + 1) * s


def centre(level: int, index: int) -> int:
    """Position id of a gist: the centre of its span."""
    start, end = token_span(level, index)
    return start + (end - start) // 2


def centre_tensor(levels: Tensor, indices: Tensor) -> Tensor:
    s = span_tensor(levels)
    return indices * s + s // 2


def parent(level: int, index: int) -> tuple[int, int]:
    """The coarser entry containing this one. LOD0 block i -> LOD1 gist i (same span);
    LOD``l`` gist i -> LOD``l+1`` gist i // 32 for l >= 1."""
    check_level_range(level)
    if level >= MAX_LEVEL:
        raise ValueError(f"level {level} has no parent (top level is {MAX_LEVEL})")
    return (1, index) if level == 0 else (level + 1, index // BLOCK)


def children(level: int, index: int) -> tuple[int, range]:
    """The finer entries of this one: LOD``l`` gist i -> LOD``l-1`` gists [32i, 32i+32) for l >= 2;
    LOD1 gist i -> LOD0 block i."""
    check_level_range(level)
    if level == 0:
        raise ValueError("an LOD0 block has no children (it is raw tokens)")
    return (0, range(index, index + 1)) if level == 1 else (level - 1, range(index * BLOCK, (index + 1) * BLOCK))


def complete_entries(num_tokens: int, level: int) -> int:
    """How many complete entries of ``level`` exist in a history of ``num_tokens`` tokens."""
    return num_tokens // span(level)


def num_levels(num_tokens: int) -> int:
    """Levels a history of ``num_tokens`` tokens has entries at: 1 + the highest level with a complete entry
    (0 for an empty or sub-block history; LOD0 and LOD1 always come together)."""
    if num_tokens < BLOCK:
        return 0
    top = 1
    while top < MAX_LEVEL and num_tokens >= span(top + 1):
        top += 1
    return top + 1


def coarsest_cost(blocks: int, max_level: int = MAX_LEVEL) -> int:
    """Slots of the coarsest gap-free tiling of blocks ``[0, blocks)`` using levels 1..``max_level``: the sum
    of the base-32 digits of ``blocks``, the top level taking the whole quotient."""
    if blocks < 0 or max_level < 1:
        raise ValueError(f"blocks={blocks}, max_level={max_level}; expected blocks >= 0 and max_level >= 1")
    total = 0
    for _ in range(max_level - 1):
        blocks, digit = divmod(blocks, BLOCK)
        total += digit
    return total + blocks


def coarsest_cost_tensor(blocks: Tensor, max_level: int = MAX_LEVEL) -> Tensor:
    """Vectorised :func:`coarsest_cost`: [n] int64 -> [n] int64."""
    total = torch.zeros_like(blocks)
    rest = blocks
    for _ in range(max_level - 1):
        total = total + rest % BLOCK
        rest = torch.div(rest, BLOCK, rounding_mode="floor")
    return total + rest


def coarsest_counts(blocks: int, max_level: int = MAX_LEVEL) -> list[int]:
    """Entries per level (index 0 = LOD1 ... ) of the coarsest tiling of ``[0, blocks)``: its base-32 digits."""
    out = []
    for _ in range(max_level - 1):
        blocks, digit = divmod(blocks, BLOCK)
        out.append(digit)
    return out + [blocks]


def smallest_with_cost(target: int, max_level: int = MAX_LEVEL) -> int:
    """Smallest block count whose coarsest tiling costs at least ``target`` slots: the digits below the top
    filled with 31 from the lowest up, the remainder in the next digit (or the top level's quotient)."""
    if target <= 0:
        return 0
    q, r = divmod(target, BLOCK - 1)
    if q < max_level - 1:
        return r * BLOCK ** q + BLOCK ** q - 1 if r else BLOCK ** q - 1
    low = BLOCK ** (max_level - 1)
    return (target - (BLOCK - 1) * (max_level - 1)) * low + low - 1


def segment_ids(counts: Tensor, total: int) -> Tensor:
    """``repeat_interleave(arange(E), counts)`` for a known ``total = counts.sum()``: [E] -> [total].

    Slot j belongs to the entry whose run contains it, i.e. the number of runs that end at or before j;
    a 1 is dropped at each run's end and cumsummed. Zero counts are fine (their entry never appears)."""
    ends = torch.cumsum(counts, 0)  # [E]
    marks = torch.zeros(total + 1, dtype=torch.long, device=counts.device)
    marks.index_add_(0, ends, torch.ones_like(ends))
    return torch.cumsum(marks[:total], 0)  # [total]


def entry_bounds(levels: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Token spans [start, end) of each entry: two [E] int64 tensors."""
    s = span_tensor(levels)
    start = indices * s
    return start, start + s
