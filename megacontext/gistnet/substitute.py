"""Substitution: build the base model's input for a window whose older part is replaced by gists.

A window is ``tokens [B, L]`` (context + horizon). Slots ``[0, raw_start)`` are replaced by a prefix of
vectors (gists, pooled baselines, or nothing for the "drop" variant) placed at given position ids,
and slots ``[raw_start, L)`` stay raw at their own absolute positions. Differentiable in the prefix,
so GistNet trains through the frozen base. This is the batched special case of a working context
used by training and evaluation; the general case lives in :mod:`megacontext.wc.working_context`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacontext.base import FrozenBase


def splice(base: FrozenBase, tokens: Tensor, raw_start: int, prefix: Tensor | None = None,
           prefix_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """tokens [B, L]; prefix [B, P, d] with prefix_positions [P] or [B, P] -> (embeds [B, P+L-raw_start, d],
    position_ids [B, P+L-raw_start])."""
    bsz, length = tokens.shape
    if not 0 <= raw_start < length:
        raise ValueError(f"raw_start={raw_start} must lie in [0, {length})")
    raw = base.embed(tokens[:, raw_start:])  # [B, L-raw_start, d]
    raw_pos = torch.arange(raw_start, length, device=raw.device).expand(bsz, -1)
    if prefix is None or prefix.shape[1] == 0:
        return raw, raw_pos
    if prefix_positions is None:
        raise ValueError("prefix_positions are required when a prefix is given")
    pos = prefix_positions.to(raw.device)
    if pos.dim() == 1:
        pos = pos.expand(bsz, -1)
    if pos.shape != prefix.shape[:2]:
        raise ValueError(f"prefix_positions shape {tuple(pos.shape)} does not match prefix {tuple(prefix.shape[:2])}")
    embeds = torch.cat([prefix.to(raw.dtype), raw], dim=1)  # [B, P+L-raw_start, d]
    return embeds, torch.cat([pos, raw_pos], dim=1)


def horizon_nll(base: FrozenBase, tokens: Tensor, horizon: int, raw_start: int, prefix: Tensor | None = None,
                prefix_positions: Tensor | None = None) -> Tensor:
    """NLL [B, H] of the last ``horizon`` tokens of the window under a (possibly gisted) context."""
    embeds, pos = splice(base, tokens, raw_start, prefix, prefix_positions)
    return base.nll(embeds, pos, tokens[:, -horizon:])
