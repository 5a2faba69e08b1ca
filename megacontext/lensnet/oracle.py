"""Oracle focus policy: scores from the *true* counterfactual utilities of the current working context.

It looks at the future (the next ``horizon`` tokens), so it is an evaluation reference, never a deployable
policy: at every step it measures, for the candidates below, the horizon-NLL change of each single expand
or collapse (:func:`megacontext.lensnet.labels.counterfactual_utilities`), turns them into signed targets
centred on the budget-balancing exchange rate (:mod:`megacontext.lensnet.targets`) and divides by the
scale LensNet was trained with, so both policies speak the same units to the allocator. The allocator then
acts greedily on them.

Cost control: every collapsible entry is measured, plus up to ``max_expand`` expandable gists (all LOD2,
then the most recent LOD1); unmeasured entries score 0 (neutral). With a few hundred entries per context
this is a few hundred base-model forwards per step, batched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megacontext.lensnet.labels import counterfactual_utilities
from megacontext.lensnet.targets import signed_targets
from megacontext.lensnet.views import DocView, actionable
from megacontext.wc_tiling import EntryState


class OraclePolicy:
    name = "oracle"

    def __init__(self, base, view: DocView, horizon: int, scale: float = 1.0, max_expand: int = 192,
                 batch_size: int = 32):
        if scale <= 0:
            raise ValueError(f"scale={scale} must be > 0 (the target scale LensNet was trained with)")
        self.base, self.view, self.horizon = base, view, horizon
        self.scale, self.max_expand, self.batch_size = scale, max_expand, batch_size
        self.last_utilities: tuple[Tensor, Tensor] | None = None

    def candidates(self, state: EntryState, t: int, recent_raw: int) -> tuple[Tensor, Tensor]:
        exp_m, col_m = actionable(state, t, recent_raw)
        # priority: LOD2 first (largest spans), then the most recent gists; a stable, deterministic order
        pri = torch.where(state.levels == 2, 1 << 40, 0) + state.indices * (state.levels == 1)
        pri = pri.masked_fill(~exp_m, -1)
        k = min(self.max_expand, int(exp_m.sum()))
        e_idx = pri.argsort(descending=True)[:k].sort().values
        return e_idx, col_m.nonzero().squeeze(1)

    def score_state(self, state: EntryState, t: int, recent_raw: int, horizon_ids: Tensor | None = None) -> Tensor:
        """Signed oracle scores [E] for a tiling of history length t."""
        e_idx, c_idx = self.candidates(state, t, recent_raw)
        gain, loss, _ = counterfactual_utilities(self.base, self.view, state, t, self.horizon, e_idx, c_idx,
                                                 self.batch_size)
        self.last_utilities = (gain, loss)
        target, _ = signed_targets(gain[None], loss[None])
        return (target[0] / self.scale).nan_to_num(0.0)

    def scores(self, wc, state=None) -> Tensor:
        return self.score_state(wc.state, wc.num_tokens, wc.cfg.recent_raw).to(wc.levels.device)
