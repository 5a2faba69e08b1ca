"""LensNet's training objective: regression + pairwise ranking + budget balance, all vectorised.

Targets are signed utilities (see :mod:`megacontext.lensnet.targets`) already divided by the training
set's scale, so ``huber_delta`` and ``rank_margin`` are in units of "typical utilities".

- Regression: Huber loss between score and target on labelled entries (Huber because counterfactual dNLL
  has heavy tails: a few entries hold the answer to the next sentence).
- Ranking: Bradley-Terry over every ordered pair of labelled entries of the same working context whose
  targets differ by more than ``rank_margin``: ``softplus(-(s_i - s_j))`` for ``t_i > t_j``. The allocator
  only ever uses the *order* of scores, so this term is what matters most; the pair matrix is
  ``[B, E, E]`` (a few hundred entries squared per context is cheap), never a Python loop over pairs.
- Budget: the soft count of expansions the scores ask for (sigmoid of positive scores on expandable
  entries) should match the soft count of collapses they offer (sigmoid of negative scores on collapsible
  entries); every action moves 31 slots, so equal counts keep the working context at its budget.

Every term is a sum over items divided by an item count (labelled entries, pairs, contexts). The
``*_sums`` functions expose the (sum, count) pairs so that data-parallel training can divide by the
*global* count (the per-rank counts of labelled entries and pairs differ); :func:`lens_loss` takes the
division as an argument and divides locally by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from megacontext.core.config import Config, check


@dataclass
class LensLossConfig(Config):
    regression: float = 1.0  # weight of the Huber term
    ranking: float = 1.0  # weight of the Bradley-Terry term
    budget: float = 0.1  # weight of the balance term
    huber_delta: float = 1.0
    rank_margin: float = 0.1  # pairs whose targets differ by less are ties and ignored
    budget_temperature: float = 1.0  # softness of the expansion/collapse counts

    def __post_init__(self):
        for name in ("regression", "ranking", "budget"):
            check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        check(self.huber_delta > 0, f"huber_delta={self.huber_delta} must be > 0")
        check(self.rank_margin >= 0, f"rank_margin={self.rank_margin} must be >= 0")
        check(self.budget_temperature > 0, f"budget_temperature={self.budget_temperature} must be > 0")


def regression_sums(scores: Tensor, targets: Tensor, labelled: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """(sum of Huber losses over labelled entries, number of labelled entries); inputs [B, E] -> two 0-dim."""
    per = F.huber_loss(scores, targets.nan_to_num(0.0), reduction="none", delta=delta)  # [B, E]
    w = labelled.float()
    return (per * w).sum(), w.sum()


def ranking_sums(scores: Tensor, targets: Tensor, labelled: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """(sum of Bradley-Terry losses, number of pairs) over within-context pairs with ``t_i - t_j > margin``."""
    t = targets.nan_to_num(0.0)
    dt = t.unsqueeze(2) - t.unsqueeze(1)  # [B, E, E]: t_i - t_j
    ds = scores.unsqueeze(2) - scores.unsqueeze(1)  # [B, E, E]
    pair = (dt > margin) & labelled.unsqueeze(2) & labelled.unsqueeze(1)
    w = pair.float()
    return (F.softplus(-ds) * w).sum(), w.sum()


def budget_sums(scores: Tensor, expandable: Tensor, collapsible: Tensor, entry_mask: Tensor,
                temperature: float) -> tuple[Tensor, Tensor]:
    """(sum over contexts of the squared expansion/collapse imbalance as a fraction of the context's entries,
    number of contexts)."""
    p = torch.sigmoid(scores / temperature)  # [B, E]
    want = (p * (expandable & entry_mask).float()).sum(1)  # [B]
    offer = ((1 - p) * (collapsible & entry_mask).float()).sum(1)
    n = entry_mask.float().sum(1).clamp_min(1.0)
    per = ((want - offer) / n) ** 2  # [B]
    return per.sum(), torch.tensor(float(per.shape[0]), device=per.device)


def _local_mean(total: Tensor, count: Tensor) -> Tensor:
    return total / count.clamp_min(1.0)


def regression_loss(scores: Tensor, targets: Tensor, labelled: Tensor, delta: float) -> Tensor:
    """Mean Huber loss over labelled entries. scores/targets [B, E], labelled [B, E] bool -> 0-dim."""
    return _local_mean(*regression_sums(scores, targets, labelled, delta))


def ranking_loss(scores: Tensor, targets: Tensor, labelled: Tensor, margin: float) -> Tensor:
    """Bradley-Terry over all within-context pairs with ``t_i - t_j > margin``. -> 0-dim mean over pairs."""
    return _local_mean(*ranking_sums(scores, targets, labelled, margin))


def budget_loss(scores: Tensor, expandable: Tensor, collapsible: Tensor, entry_mask: Tensor,
                temperature: float) -> Tensor:
    """Squared imbalance between soft expansion and collapse counts, per context, as a fraction of its
    entries. -> 0-dim mean over contexts."""
    return _local_mean(*budget_sums(scores, expandable, collapsible, entry_mask, temperature))


def lens_loss(scores: Tensor, targets: Tensor, labelled: Tensor, expandable: Tensor, collapsible: Tensor,
              entry_mask: Tensor, cfg: LensLossConfig,
              mean: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """All terms and their weighted sum under ``"loss"``; every tensor [B, E].

    ``mean(sum, count)`` turns each term's (sum, count) into its value; the default divides locally. Data
    parallel training passes :func:`megacontext.core.distributed.global_mean`, so every term is normalised by
    its count over the whole global batch (labelled entries and pairs differ between ranks)."""
    mean = mean or _local_mean
    reg = mean(*regression_sums(scores, targets, labelled, cfg.huber_delta))
    rank = mean(*ranking_sums(scores, targets, labelled, cfg.rank_margin))
    bud = mean(*budget_sums(scores, expandable, collapsible, entry_mask, cfg.budget_temperature))
    total = cfg.regression * reg + cfg.ranking * rank + cfg.budget * bud
    return {"loss": total, "regression": reg, "ranking": rank, "budget": bud}
