"""Materialisation: turn a working-context tiling into the base model's ``inputs_embeds`` + ``position_ids``.

Slot order is entry order (time order): an LOD0 block contributes its 32 token embeddings, a gist one
vector, and the raw tail (tokens after the last complete block) comes last.

Position modes (``WorkingContextConfig.position_mode``):
- ``absolute`` (design default): a token sits at its own index in the history, a gist at the centre of
  its span, so RoPE distances to the gist match the average distance of the tokens it replaces.
- ``compact``: slots get consecutive positions 0..T-1, so every distance stays inside the native window
  regardless of how long the history is.

Design: no per-entry Python loop. Raw token ids are read per *contiguous raw run* (a handful: the recent
region plus expanded islands) and embedded with one ``embed`` call; gists are read with one
``gather_gists`` call per gist level present; everything is then placed in slot order by a single gather through the
inverse slot permutation, which keeps the result differentiable in the gists. Batched materialisation
embeds the raw tokens of all working contexts in one call and left-pads, so ``logits[:, -1]`` is every
row's next-token prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.core.lod import BLOCK, centre_tensor, cost_tensor, entry_bounds, segment_ids
from megacontext.wc.tiling import WorkingContextError

TAIL_SLOT, PAD_SLOT = -1, -2  # slot_entry values for raw-tail slots and (batched) padding


@dataclass
class Materialized:
    inputs_embeds: Tensor  # [T, d]
    position_ids: Tensor  # [T]
    slot_entry: Tensor  # [T] entry of each slot; TAIL_SLOT for the raw tail
    entry_first_slot: Tensor  # [E] first slot of each entry
    entry_num_slots: Tensor  # [E] 32 for LOD0, 1 for gists
    attention_mask: Tensor  # [T] ones; pass it (as [1, T]) to the base model, see below

    # Why an all-ones mask: with attention_mask=None, transformers >= 4.5x infers *packed sequences* from
    # position_ids and starts a new document wherever consecutive ids differ by != 1, which is exactly
    # what gist positions do in absolute mode; an explicit mask switches that inference off.


@dataclass
class BatchMaterialized:
    inputs_embeds: Tensor  # [B, T, d] left-padded
    position_ids: Tensor  # [B, T] (0 on padding)
    attention_mask: Tensor  # [B, T] 1 = real slot, 0 = padding
    slot_entry: Tensor  # [B, T] entry per slot; TAIL_SLOT tail, PAD_SLOT padding
    items: list[Materialized]  # per-WC views with entry_first_slot already shifted by the padding


@dataclass
class _Plan:
    token_ids: Tensor  # [R] raw token ids in slot order
    raw_slots: Tensor  # [R]
    gists: list[tuple[Tensor, Tensor]]  # (slots [n], vectors [n, d]) per gist level present
    position_ids: Tensor  # [T]
    slot_entry: Tensor  # [T]
    first_slot: Tensor  # [E]
    num_slots: Tensor  # [E]
    length: int


def _read_tokens(source, positions: Tensor) -> Tensor:
    """Token ids at sorted ``positions`` [R], read with one ``tokens(start, end)`` call per contiguous run."""
    if positions.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    starts = torch.cat([breaks.new_zeros(1), breaks])
    ends = torch.cat([breaks, breaks.new_tensor([positions.numel()])])
    bounds = torch.stack([positions[starts], positions[ends - 1] + 1], 1).tolist()  # one sync
    return torch.cat([torch.as_tensor(source.tokens(s, e)).long().cpu() for s, e in bounds])


def _plan(levels: Tensor, indices: Tensor, num_tokens: int, source, position_mode: str) -> _Plan:
    if source.num_tokens < num_tokens:
        raise WorkingContextError(f"history source holds {source.num_tokens} tokens but the working context "
                                  f"covers {num_tokens}; append to the source before materialising")
    if position_mode not in ("absolute", "compact"):
        raise WorkingContextError(f"position_mode={position_mode!r}; expected 'absolute' or 'compact'")
    dev = levels.device
    num_slots = cost_tensor(levels)  # [E]
    first_slot = torch.cumsum(num_slots, 0) - num_slots
    body = int(num_slots.sum())
    tail = num_tokens % BLOCK
    length = body + tail
    start, _ = entry_bounds(levels, indices)

    offs = torch.arange(BLOCK, device=dev)
    raw = levels == 0
    raw_slots = (first_slot[raw][:, None] + offs).flatten()  # [32 * n0]
    raw_pos = (start[raw][:, None] + offs).flatten()
    tail_pos = torch.arange(num_tokens - tail, num_tokens, device=dev)
    raw_slots = torch.cat([raw_slots, torch.arange(body, length, device=dev)])
    raw_pos = torch.cat([raw_pos, tail_pos])

    positions = torch.zeros(length, dtype=torch.long, device=dev)
    positions[raw_slots] = raw_pos
    gists = []
    top = int(levels.max()) if levels.numel() else 0  # one sync; a history uses only the levels it needs
    for level in range(1, top + 1):
        sel = levels == level
        idx = indices[sel]
        if idx.numel():
            slots = first_slot[sel]
            positions[slots] = centre_tensor(torch.full_like(idx, level), idx)
            gists.append((slots, source.gather_gists(level, idx)))
    if position_mode == "compact":
        positions = torch.arange(length, device=dev)
    slot_entry = torch.cat([segment_ids(num_slots, body),
                            torch.full((tail,), TAIL_SLOT, dtype=torch.long, device=dev)])
    return _Plan(_read_tokens(source, raw_pos), raw_slots, gists, positions, slot_entry, first_slot, num_slots,
                 length)


def _place(plan: _Plan, raw_embeds: Tensor) -> Materialized:
    """Put raw embeddings and gists into slot order with one gather (differentiable in the gists)."""
    dev, dtype = raw_embeds.device, raw_embeds.dtype
    slots = torch.cat([plan.raw_slots.to(dev)] + [s.to(dev) for s, _ in plan.gists])  # [T], a permutation
    values = torch.cat([raw_embeds] + [g.to(device=dev, dtype=dtype) for _, g in plan.gists])  # [T, d]
    inverse = torch.empty_like(slots)
    inverse[slots] = torch.arange(slots.shape[0], device=dev)
    return Materialized(values[inverse], plan.position_ids.to(dev), plan.slot_entry.to(dev),
                        plan.first_slot.to(dev), plan.num_slots.to(dev),
                        torch.ones(plan.length, dtype=torch.long, device=dev))


def materialize_tiling(levels: Tensor, indices: Tensor, num_tokens: int, source,
                       embed: Callable[[Tensor], Tensor], position_mode: str = "absolute") -> Materialized:
    """One working context -> :class:`Materialized`. ``embed`` maps ids [R] -> [R, d] (FrozenBase.embed)."""
    plan = _plan(levels, indices, num_tokens, source, position_mode)
    return _place(plan, embed(plan.token_ids))


def materialize_batch(wcs: Sequence, sources, embed: Callable[[Tensor], Tensor]) -> BatchMaterialized:
    """Many working contexts at once: one ``embed`` call for all raw tokens, left padding to the longest.

    ``sources`` is one history source shared by all, or a sequence with one per working context."""
    if not wcs:
        raise WorkingContextError("materialize_batch needs at least one working context")
    if not isinstance(sources, Sequence):
        sources = [sources] * len(wcs)
    if len(sources) != len(wcs):
        raise WorkingContextError(f"got {len(sources)} history sources for {len(wcs)} working contexts")
    plans = [_plan(wc.levels, wc.indices, wc.num_tokens, src, wc.cfg.position_mode)
             for wc, src in zip(wcs, sources, strict=True)]
    counts = [p.token_ids.shape[0] for p in plans]
    raw_all = embed(torch.cat([p.token_ids for p in plans]))  # [sum R, d]
    items = [_place(p, r) for p, r in zip(plans, torch.split(raw_all, counts), strict=True)]

    width = max(p.length for p in plans)
    bsz, d = len(items), raw_all.shape[-1]
    dev = raw_all.device
    embeds = raw_all.new_zeros(bsz, width, d)
    positions = torch.zeros(bsz, width, dtype=torch.long, device=dev)
    mask = torch.zeros(bsz, width, dtype=torch.long, device=dev)
    slot_entry = torch.full((bsz, width), PAD_SLOT, dtype=torch.long, device=dev)
    rows = []
    for b, item in enumerate(items):  # a loop over working contexts, not entries
        pad = width - item.inputs_embeds.shape[0]
        rows.append(item.inputs_embeds if pad == 0 else torch.cat([embeds[b, :pad], item.inputs_embeds]))
        positions[b, pad:] = item.position_ids
        mask[b, pad:] = 1
        slot_entry[b, pad:] = item.slot_entry
        item.entry_first_slot = item.entry_first_slot + pad
    return BatchMaterialized(torch.stack(rows), positions, mask, slot_entry, items)
