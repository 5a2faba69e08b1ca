"""MegaContext: a virtually unbounded memory for any frozen Hugging Face causal LM.

One package per layer; every import points down this DAG (``tests/test_layering.py`` enforces it, lazy
imports included; units on one line are siblings and never import each other)::

    core                       config, LOD geometry, assets, device, checkpoints, stats, provenance
    data                       corpora -> token caches -> windows
    base                       the frozen-model adapter (base.py)
    tree                       the on-disk history (LOD0 tokens, gists of LOD1, LOD2, ...; checksums), views
    gistnet | wc               the compressor and its evaluation | working context, tiling, allocator
    lensnet                    the learned focus network, its labels and training
    focus                      policies (recency, lexical, LensNet, oracles) and their evaluation
    runtime                    engine, sampling, telemetry, focus map, engine state on disk, fsck
    api                        MegaContext (api.py), re-exported here with the public configs
    demo | bench | serve       the README demo | baselines and benchmark harness | the memory service
    cli                        the ``megacontext`` command (``python -m megacontext``)

``from megacontext import MegaContext, EngineConfig`` works; the names are resolved on first use, so
importing a low layer (``megacontext.core.config``) never loads the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it (resolved lazily by __getattr__)
_EXPORTS = {
    "MegaContext": "megacontext.api",
    "EngineConfig": "megacontext.runtime.engine",
    "SamplingConfig": "megacontext.runtime.sampling",
    "WorkingContextConfig": "megacontext.wc",
    "AllocatorConfig": "megacontext.wc",
    "TreeConfig": "megacontext.tree.store",
    "LexicalFocusConfig": "megacontext.focus.lexical",
    "TelemetryConfig": "megacontext.runtime.telemetry",
}

__all__ = [  # = "__version__" + _EXPORTS (tests/test_layering.py checks they agree)
    "AllocatorConfig", "EngineConfig", "LexicalFocusConfig", "MegaContext", "SamplingConfig", "TelemetryConfig",
    "TreeConfig", "WorkingContextConfig", "__version__",
]

if TYPE_CHECKING:
    from megacontext.api import MegaContext
    from megacontext.focus.lexical import LexicalFocusConfig
    from megacontext.runtime.engine import EngineConfig
    from megacontext.runtime.sampling import SamplingConfig
    from megacontext.runtime.telemetry import TelemetryConfig
    from megacontext.tree.store import TreeConfig
    from megacontext.wc import AllocatorConfig, WorkingContextConfig


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megacontext' has no attribute {name!r}")
