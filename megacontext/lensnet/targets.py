"""Signed focus targets from counterfactual utilities, centred on the budget-balancing exchange rate.

Raw labels per entry (nats per horizon token, NaN where not applicable or not measured):
- ``gain [B, E]``: NLL(current) - NLL(entry expanded) — what 31 more slots of detail here would buy;
- ``loss [B, E]``: NLL(entry collapsed) - NLL(current) — what giving up 31 slots of detail here would cost
  (LOD0 blocks, and the first LOD1 entry of a complete 32-sibling run, which collapses the whole run).

Every action moves exactly 31 slots, so at a full budget the best trades pair the largest gains with the
smallest losses: sort gains descending and losses ascending; the first ``k*`` pairs with ``gain > loss`` are
worth doing. Any exchange rate ``tau`` between the k*-th and (k*+1)-th pair separates them, and we take
the midpoint of that interval. The signed target is then ``gain - tau`` where it is positive (expand),
``loss - tau`` where that is negative (collapse), and otherwise the entry's distance from acting (sign
meaning "keep" for LOD0, "leave" for gists). A zero-threshold allocator fed these targets performs exactly
the ``k*`` beneficial trades, so expansions and collapses are balanced by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def exchange_rate(gain: Tensor, loss: Tensor) -> Tensor:
    """[B, E] gains and losses (NaN = absent) -> tau [B] (0 where a context has neither)."""
    inf = torch.tensor(float("inf"), device=gain.device)
    g = torch.where(gain.isnan(), -inf, gain).sort(dim=1, descending=True).values  # [B, E]
    c = torch.where(loss.isnan(), inf, loss).sort(dim=1).values  # [B, E]
    k = (g > c).sum(dim=1, keepdim=True)  # [B, 1] beneficial trades (g - c is non-increasing)
    ones = torch.ones_like(g[:, :1])
    gp = torch.cat([ones * inf, g, -ones * inf], dim=1)  # gp[j] = g[j-1]
    cp = torch.cat([-ones * inf, c, ones * inf], dim=1)  # cp[j] = c[j-1]
    lower = torch.maximum(gp.gather(1, k + 1), cp.gather(1, k)).squeeze(1)  # max(g[k], c[k-1])
    upper = torch.minimum(gp.gather(1, k), cp.gather(1, k + 1)).squeeze(1)  # min(g[k-1], c[k])
    lo_ok, up_ok = lower.isfinite(), upper.isfinite()
    mid = (lower + upper) / 2
    return torch.where(lo_ok & up_ok, mid, torch.where(lo_ok, lower, torch.where(up_ok, upper, 0.0)))


def signed_targets(gain: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    """-> (targets [B, E] with NaN where an entry has no label, tau [B])."""
    tau = exchange_rate(gain, loss).unsqueeze(1)  # [B, 1]
    has_g, has_c = ~gain.isnan(), ~loss.isnan()
    g, c = gain - tau, loss - tau
    expand = has_g & (g > 0)
    collapse = has_c & (c < 0)
    idle = torch.where(has_g & has_c, torch.zeros_like(g), torch.where(has_g, g, c))
    out = torch.where(expand, g, torch.where(collapse, c, idle))
    return out.masked_fill(~(has_g | has_c), float("nan")), tau.squeeze(1)
