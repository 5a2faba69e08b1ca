"""Recency focus: no scores at all; the working context's own recency rule is the whole policy.

The WC keeps the newest tokens raw and collapses older detail to LOD1, then LOD2, as the history grows
(:meth:`megacontext.wc.WorkingContext.sync`). This is the baseline every learned policy must beat.
"""

from __future__ import annotations

from torch import Tensor

from megacontext.focus.policy import FocusState


class RecencyFocus:
    """No scores: the WC's recency rule alone decides (see module docstring)."""

    name = "recency"
    query_tokens = 0  # reads no query

    def scores(self, wc, state: FocusState) -> Tensor | None:
        return None
