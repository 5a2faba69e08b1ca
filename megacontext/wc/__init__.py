"""Working context: the budgeted tiling of the history that the frozen base model reads, and the
allocator that refocuses it.

- :mod:`.working_context`: :class:`WorkingContext`, the stateful object callers use (sync, expand,
  collapse, refocus, materialize, spans, state_dict).
- :mod:`.tiling`: tilings as tensors (:class:`EntryState`) and the pure vectorised functions on them.
- :mod:`.allocator`: scores -> legal expand/collapse actions under the budget.
- :mod:`.materialize`: a tiling -> ``inputs_embeds`` / ``position_ids`` for the base model.

Other packages import from here (``from megacontext.wc import WorkingContext, EntryState, min_cost``).
"""

from megacontext.wc.allocator import AllocatorConfig, StepTelemetry
from megacontext.wc.materialize import Materialized
from megacontext.wc.tiling import (
    ACTION_COST,
    BudgetError,
    EntryState,
    IllegalActionError,
    InvariantError,
    WorkingContextError,
    min_cost,
    min_w_max,
    reach,
)
from megacontext.wc.working_context import WorkingContext, WorkingContextConfig, check_invariants

__all__ = [
    "ACTION_COST", "AllocatorConfig", "BudgetError", "EntryState", "IllegalActionError", "InvariantError",
    "Materialized", "StepTelemetry", "WorkingContext", "WorkingContextConfig", "WorkingContextError",
    "check_invariants", "min_cost", "min_w_max", "reach",
]
