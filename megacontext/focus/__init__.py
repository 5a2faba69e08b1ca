"""Focus policies: who tells the allocator where to zoom in or out.

- :mod:`.policy`: the :class:`FocusPolicy` protocol, :class:`FocusState`, shared scoring helpers.
- :mod:`.recency`, :mod:`.lexical`: the built-in policies; :mod:`.registry` builds them by name.
- :mod:`.lens`: LensNet behind the protocol (:class:`~megacontext.focus.lens.LensPolicy`).
- :mod:`.oracles`: evaluation references (counterfactual and evidence oracles).
- :mod:`.evaluation`: ``eval focus``, recency vs LensNet vs oracle end to end and on QMSum.
"""

from megacontext.focus.lexical import LexicalFocus, LexicalFocusConfig
from megacontext.focus.policy import FocusPolicy, FocusState
from megacontext.focus.recency import RecencyFocus
from megacontext.focus.registry import make_policy

__all__ = ["FocusPolicy", "FocusState", "LexicalFocus", "LexicalFocusConfig", "RecencyFocus", "make_policy"]
