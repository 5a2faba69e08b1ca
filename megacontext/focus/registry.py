"""Focus policies by name: the ones the engine can build from its config alone.

``EngineConfig.focus`` names a policy. Name-only policies (no checkpoint, no data) are built here;
``lensnet`` needs a checkpoint and is built by the API (:func:`megacontext.focus.lens.LensPolicy.load`),
oracles need the future or known evidence and are built by evaluations and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

from megacontext.focus.lexical import LexicalFocus
from megacontext.focus.policy import FocusPolicy
from megacontext.focus.recency import RecencyFocus

BUILTIN: dict[str, Callable[[], FocusPolicy]] = {"recency": RecencyFocus, "lexical": LexicalFocus}
CHECKPOINT_POLICIES = ("lensnet",)  # built from a checkpoint by the API
# "auto" (the product default) is resolved by the API when a memory is created: LensNet when a checkpoint for
# this base model is given or embedded, else the training-free lexical policy (megacontext.runtime.components)
POLICY_NAMES = (*BUILTIN, *CHECKPOINT_POLICIES, "auto")


def make_policy(name: str) -> FocusPolicy:
    """A built-in policy by name ('recency' or 'lexical'; 'auto' without a LensNet is 'lexical')."""
    if name == "auto":
        name = "lexical"
    if name not in BUILTIN:
        raise ValueError(f"focus policy {name!r} is not built in; expected one of {sorted(BUILTIN)}"
                         + (" (lensnet needs a checkpoint: pass lensnet=...)" if name in CHECKPOINT_POLICIES else ""))
    return BUILTIN[name]()
