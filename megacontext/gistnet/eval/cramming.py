"""Cramming: per-window optimised prefix vectors, the upper bound for any compressor at a given level.

For each window we optimise one free vector per gisted span (one per 32-token block at LOD1, one per
1,024 tokens at LOD2) with Adam while the base model stays frozen. The objective is the KL divergence
from the raw-context model to the spliced model over every position after the gisted span (the raw
remainder of the context *and* the horizon). Distilling from the raw model, rather than minimising
NLL of the true tokens, is deliberate: the vectors may reproduce what the raw context tells the model
but cannot memorise the horizon's identity beyond that, so "gap recovered" stays a meaningful share
of the raw model's advantage (close to, and not far above, 1) instead of a measure of memorisation.

Invariants
- Windows are optimised independently: the loss is a *sum* over windows, so each window's gradient
  does not depend on which other windows share its batch, and Adam is elementwise.
- The base model is never updated (FrozenBase parameters have ``requires_grad=False``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megacontext.base import FrozenBase
from megacontext.core.config import Config, check
from megacontext.gistnet.substitute import splice

log = logging.getLogger(__name__)


@dataclass
class CramConfig(Config):
    windows: int = 32  # windows per domain and setting that get crammed (0 disables the upper bound)
    steps: int = 300
    lr: float = 0.01
    batch: int = 16  # windows optimised together (memory: batch x positions x vocab float32 teacher)
    init: Literal["gist", "meanpool"] = "gist"  # starting point; falls back to meanpool without a GistNet

    def __post_init__(self):
        check(self.windows >= 0, f"cram.windows={self.windows} must be >= 0")
        check(self.steps >= 1, f"cram.steps={self.steps} must be >= 1")
        check(self.lr > 0, f"cram.lr={self.lr} must be > 0")
        check(self.batch >= 1, f"cram.batch={self.batch} must be >= 1")
        check(self.init in ("gist", "meanpool"), f"cram.init={self.init!r} must be 'gist' or 'meanpool'")


def _tail_logprobs(base: FrozenBase, embeds: Tensor, positions: Tensor, n: int) -> Tensor:
    """Log-probs [B, n, V] of the last n tokens of the sequence, predicted from the slot before each."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # see gist.window_nll
    logits = base.forward(embeds, positions, mask, logits_to_keep=n + 1).logits[:, :-1]  # [B, n, V]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def teacher_logprobs(base: FrozenBase, tokens: Tensor, raw_start: int) -> Tensor:
    """The raw-context model's log-probs [B, L - raw_start, V] for tokens raw_start..L-1 of tokens [B, L]."""
    embeds, pos = splice(base, tokens, 0)
    return _tail_logprobs(base, embeds, pos, tokens.shape[1] - raw_start)


def cram_kl(base: FrozenBase, tokens: Tensor, raw_start: int, prefix: Tensor, prefix_positions: Tensor,
            teacher: Tensor) -> Tensor:
    """Per-window KL(raw || spliced) [B], averaged over the positions after the gisted span."""
    embeds, pos = splice(base, tokens, raw_start, prefix, prefix_positions)  # [B, P + L - g, d]
    student = _tail_logprobs(base, embeds, pos, teacher.shape[1])  # [B, L - g, V]
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [B, L - g]
    return kl.mean(-1)


def cram(base: FrozenBase, tokens: Tensor, raw_start: int, init: Tensor, prefix_positions: Tensor,
         steps: int = 300, lr: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """Optimise prefix vectors for tokens [B, L] whose first ``raw_start`` tokens are replaced.

    init [B, P, d] -> (crammed [B, P, d] float32 detached, KL at init [B], KL at the end [B])."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    teacher = teacher_logprobs(base, tokens, raw_start)  # [B, L - g, V]
    vecs = torch.nn.Parameter(init.detach().float().clone())  # fp32 master copy even on a bf16 base
    opt = torch.optim.Adam([vecs], lr=lr)
    with torch.no_grad():
        kl_init = cram_kl(base, tokens, raw_start, vecs, prefix_positions, teacher)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = cram_kl(base, tokens, raw_start, vecs, prefix_positions, teacher).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        kl_end = cram_kl(base, tokens, raw_start, vecs, prefix_positions, teacher)
    return vecs.detach(), kl_init, kl_end
