"""Working context: the budgeted tiling of the history that the frozen base model reads, and the
allocator that refocuses it.

- :mod:`.working_context`: :class:`WorkingContext`, the stateful object callers use (sync, expand,
  collapse, refocus, materialize, spans, state_dict).
- :mod:`.tiling`: tilings as tensors (:class:`EntryState`) and the pure vectorised functions on them.
- :mod:`.allocator`: scores -> legal expand/collapse actions under the budget.
- :mod:`.materialize`: a tiling -> ``inputs_embeds`` / ``position_ids`` for the base model.

Other packages import from here, never from the modules (``tests/test_layering.py`` checks it): the live
working context through :class:`WorkingContext`'s methods; code that reasons about tilings other than
the live one (LensNet's counterfactual labels, per-chunk benchmark contexts, the runtime's reads of a WC's
slots after a cached prefix) through the pure tiling functions exported below.
"""

from megacontext.wc.allocator import AllocatorConfig, StepTelemetry
from megacontext.wc.materialize import TAIL_SLOT, Materialized, materialize_tiling
from megacontext.wc.tiling import (
    ACTION_COST,
    BudgetError,
    EntryState,
    IllegalActionError,
    InvariantError,
    WorkingContextError,
    apply_actions,
    collapse_by_recency,
    first_protected_block,
    min_cost,
    min_w_max,
    reach,
    sibling_runs,
)
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig, check_invariants

__all__ = [
    "ACTION_COST", "TAIL_SLOT", "AllocatorConfig", "BudgetError", "EntryState", "IllegalActionError",
    "InvariantError", "Materialized", "StepTelemetry", "WorkingContext", "WorkingContextConfig",
    "WorkingContextError", "apply_actions", "check_invariants", "collapse_by_recency", "first_protected_block",
    "materialize_tiling", "min_cost", "min_w_max", "reach", "sibling_runs",
]
