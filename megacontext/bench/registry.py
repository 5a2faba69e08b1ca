"""Name -> system factory. Only systems that can actually run are listed.

A factory takes ``(base, options)`` — the frozen base model and a dict of settings (the suite's shared
``chunk`` / ``batch_tokens`` plus the system's own ``system_options`` entry) — and returns a
:class:`~megacontext.bench.system.System`, or raises :class:`SystemUnavailable` with the reason (then the
harness logs it and leaves the system out of the tables).

Registration point for MegaContext systems: the engine's adapter module calls :func:`register_system`
at import time (names planned in the issue: ``megacontext-recency``, ``megacontext-lensnet``,
``megacontext-oracle``, ``meanpool-recency``) and is listed in ``PLUGIN_MODULES`` below. Until such a module
exists nothing is registered under those names, so they are simply not available.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from megacontext.bench.system import System

log = logging.getLogger(__name__)

SystemFactory = Callable[[object, dict], System]
_REGISTRY: dict[str, SystemFactory] = {}

# >>> MegaContext registration point: add engine adapter modules here (each calls register_system on import).
PLUGIN_MODULES: list[str] = ["megacontext.bench.megacontext_systems"]
# <<<


class SystemUnavailable(RuntimeError):
    """A registered system cannot run in this environment (missing package, missing checkpoint, ...)."""


def register_system(name: str, factory: SystemFactory) -> None:
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"system name {name!r} is already registered")
    _REGISTRY[name] = factory


def _load_plugins() -> None:
    for module in PLUGIN_MODULES:
        importlib.import_module(module)


def available_systems() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def build_system(name: str, base, options: dict | None = None) -> System:
    _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown system {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](base, dict(options or {}))


# ---------------------------------------------------------------------------------------------- baselines
def _full(base, opts):
    from megacontext.bench.truncation import FullAttention, WindowConfig

    return FullAttention(base.native_window, WindowConfig.from_dict(opts))


def _truncation(base, opts):
    from megacontext.bench.truncation import Truncation, WindowConfig

    return Truncation(WindowConfig.from_dict(opts))


def _sinks(positions: str) -> SystemFactory:
    def make(base, opts):
        from megacontext.bench.sinks import AttentionSinks, SinksConfig

        return AttentionSinks(SinksConfig.from_dict({"positions": positions, **opts}))

    return make


def _bm25(positions: str) -> SystemFactory:
    def make(base, opts):
        try:
            import rank_bm25  # noqa: F401
        except ImportError as e:
            raise SystemUnavailable(f"rank_bm25 is not installed ({e}); pip install 'megacontext[bench]'") from e
        from megacontext.bench.retrieval import BM25Retrieval, RetrievalConfig

        return BM25Retrieval(RetrievalConfig.from_dict({"positions": positions, **opts}))

    return make


def _llmlingua(base, opts):
    from megacontext.bench.llmlingua_system import LLMLinguaConfig, LLMLinguaSystem, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise SystemUnavailable(reason)
    return LLMLinguaSystem(base, LLMLinguaConfig.from_dict(opts))


register_system("full", _full)
register_system("truncation", _truncation)
register_system("sinks", _sinks("compact"))
register_system("sinks-absolute", _sinks("absolute"))
register_system("bm25", _bm25("absolute"))
register_system("bm25-compact", _bm25("compact"))
register_system("llmlingua", _llmlingua)
