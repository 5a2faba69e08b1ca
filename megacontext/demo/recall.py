"""Forced-choice recall for the demo: how a fixed set of same-kind candidate answers rank after one read.

Greedy completion is a harsh recall test for a small base model: it must both see the fact and prefer to
copy it over every other continuation. Forced choice asks the narrower question the memory is responsible
for: among the true answer and distractors of the same kind (other 4-digit numbers, other pet names, ...),
none of which occurs in the text, does the true answer get the highest likelihood? A context that does
not contain the fact leaves the model at its prior over the candidates, so ranking first by chance has
probability 1/C.

Design choices:
- One prefill of the context (batch 1, KV cache) serves the greedy completion and all candidates: the
  cache is cropped back after the greedy steps, then repeated C times in the batch dimension and the C
  candidates are read in one batched forward. Candidates are right-padded: under causal attention a pad
  slot comes after every real token of its row, so it cannot change their logits, and its loss is masked.
- Candidates are scored by summed NLL of all their tokens (the string's log-probability), not a
  per-token mean, so a multi-token answer is not favoured or penalised for its length by the score's form.
- The context is given as embeddings + position ids, so raw windows and MegaContext working contexts go
  through the same code; appended tokens take positions ``pos[-1] + 1, ...`` (as ``Engine.peek_greedy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megacontext.base import FrozenBase


@dataclass
class ChoiceRead:
    nll: Tensor  # [C] summed NLL (nats) of each candidate after the context
    ranks: Tensor  # [C] rank of each candidate, 1 = likeliest; a permutation of 1..C
    greedy: list[int]  # greedy continuation of the context


def ranks_of(nll: Tensor) -> Tensor:
    """Rank [C] of each score, 1 = lowest NLL; ties keep candidate order so the result is a permutation."""
    order = torch.sort(nll, stable=True).indices  # [C]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, nll.numel() + 1, device=nll.device)
    return ranks


def _pad(candidates: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded ids [C, L] and the mask [C, L] of real tokens."""
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError(f"need at least one candidate and no empty candidate, got lengths "
                         f"{[len(c) for c in candidates]}")
    width = max(len(c) for c in candidates)
    ids = torch.full((len(candidates), width), pad, dtype=torch.long)
    for i, c in enumerate(candidates):  # building the input, not a hot path: C is ~8
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return ids, torch.arange(width)[None] < torch.tensor([len(c) for c in candidates])[:, None]


@torch.no_grad()
def read_choices(base: FrozenBase, embeds: Tensor, pos: Tensor, candidates: list[list[int]], n_new: int = 0,
                 stop: set[int] | None = None) -> ChoiceRead:
    """Score ``candidates`` (token-id lists) as continuations of a context and greedily continue it.

    ``embeds`` [T, d] and ``pos`` [T] are what the base reads; nothing is kept between calls."""
    if embeds.dim() != 2 or pos.shape != embeds.shape[:1]:
        raise ValueError(f"expected embeds [T, d] and pos [T], got {tuple(embeds.shape)} and {tuple(pos.shape)}")
    ids, real = _pad(candidates)  # [C, L]
    c, width = ids.shape
    nxt = int(pos[-1]) + 1
    res = base.forward(embeds[None], pos[None], use_cache=True, logits_to_keep=1)
    first = res.logits[0, -1].float()  # [V] predicts every candidate's first token and the first greedy token
    cache = res.past_key_values

    greedy: list[int] = []
    tok_logits = first
    for i in range(n_new):
        tok = int(tok_logits.argmax())
        greedy.append(tok)
        if (stop and tok in stop) or i + 1 == n_new:
            break
        step = base.forward(base.embed(torch.tensor([[tok]])), torch.tensor([[nxt + i]]), past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
        cache, tok_logits = step.past_key_values, step.logits[0, -1].float()
    if len(greedy) > 1:
        cache.crop(-(len(greedy) - 1))  # negative = drop that many (transformers 4.x and 5.x)

    logits = first.expand(c, 1, -1)  # [C, 1, V]
    if width > 1:
        cache.batch_repeat_interleave(c)
        more = base.forward(base.embed(ids[:, :-1]), torch.arange(nxt, nxt + width - 1)[None].expand(c, -1),
                            past_key_values=cache)
        logits = torch.cat([logits, more.logits.float()], dim=1)  # [C, L, V]
    tok_nll = torch.nn.functional.cross_entropy(logits.reshape(c * width, -1), ids.to(logits.device).reshape(-1),
                                                reduction="none").view(c, width)  # [C, L]
    nll = (tok_nll * real.to(tok_nll.device)).sum(-1).cpu()  # [C]
    return ChoiceRead(nll=nll, ranks=ranks_of(nll), greedy=greedy)


def read_raw(base: FrozenBase, ctx: list[int], candidates: list[list[int]], n_new: int = 0,
             stop: set[int] | None = None) -> ChoiceRead:
    """:func:`read_choices` when the base reads exactly the token ids ``ctx`` at positions 0..len-1."""
    if not ctx:
        raise ValueError("read_raw needs a non-empty context")
    return read_choices(base, base.embed(torch.tensor(ctx)), torch.arange(len(ctx)), candidates, n_new, stop)
