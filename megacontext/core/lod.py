"""Span arithmetic of the LOD hierarchy: pure integer/tensor functions, no state.

Levels: LOD0 = raw 32-token blocks, LOD1 = one gist per block (covers 32 tokens), LOD2 = one gist per
32 LOD1 gists (covers 1,024 tokens). An entry is addressed by ``(level, index)``; its token span is
``[index * span(level), (index + 1) * span(level))`` where ``span(level) = BLOCK ** max(level, 1)`` —
an LOD0 *block* and an LOD1 gist cover the same 32 tokens, LOD2 covers 1,024.

Entry tensors: a tiling's entries are two aligned [E] tensors ``levels`` and ``indices``;
:func:`entry_bounds` gives their token spans and :func:`segment_ids` expands per-entry counts (blocks,
slots) into a per-item entry index, the vectorised step every consumer of a tiling needs.

Gist placement (the design default): a gist sits at the centre of its span, ``start + span // 2``,
so its RoPE distance to the following tokens matches the average distance of the tokens it replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32  # tokens per LOD0 block and children per gist; fixed by the design
MAX_LEVEL = 2


def span(level: int) -> int:
    """Tokens covered by one entry of ``level`` (LOD0 block = LOD1 gist = 32, LOD2 = 1024)."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level={level} is out of range; expected 0..{MAX_LEVEL}")
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
    LOD1 gist i -> LOD2 gist i // 32."""
    if level >= MAX_LEVEL:
        raise ValueError(f"level {level} has no parent (top level is {MAX_LEVEL})")
    return (1, index) if level == 0 else (level + 1, index // BLOCK)


def children(level: int, index: int) -> tuple[int, range]:
    """The finer entries of this one: LOD2 gist i -> LOD1 gists [32i, 32i+32); LOD1 gist i -> LOD0 block i."""
    if level == 0:
        raise ValueError("an LOD0 block has no children (it is raw tokens)")
    return (0, range(index, index + 1)) if level == 1 else (level - 1, range(index * BLOCK, (index + 1) * BLOCK))


def complete_entries(num_tokens: int, level: int) -> int:
    """How many complete entries of ``level`` exist in a history of ``num_tokens`` tokens."""
    return num_tokens // span(level)


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
