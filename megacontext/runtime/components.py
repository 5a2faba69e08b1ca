"""What a memory is assembled from: the base model, the gist compressor, the focus policy, and how a store
records them; and the position mode a base model can be read in.

The API (:mod:`megacontext.api`) calls these when it creates or opens a store. An embedded model name is
recorded as the name (found again after a reinstall or on another machine, :mod:`megacontext.core.assets`), a
path as an absolute path. Checkpoints are checked when they are loaded: a missing directory, another base
model's checkpoint or a LOD2 net trained on another LOD1 net are refused with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megacontext.base import FrozenBase
from megacontext.core.assets import BASE_MODEL, EMBEDDED, GISTNET_MODEL, LENSNET_MODEL, AssetError
from megacontext.core.checkpoint import CheckpointError, read_checkpoint_meta
from megacontext.focus.registry import make_policy
from megacontext.runtime.engine import EngineConfig
from megacontext.tree import MeanPoolCompressor

log = logging.getLogger(__name__)


def load_base(base, device, dtype) -> FrozenBase:
    if isinstance(base, FrozenBase):
        return base
    return FrozenBase.load(str(base or BASE_MODEL), device=device, dtype=dtype)


def resolve_gistnet(base: FrozenBase, gistnet: str | None) -> str | None:
    """``"auto"`` -> the embedded GistNet (its name) when it was trained for this base model, else None (mean
    pooling)."""
    return _embedded_for(base, GISTNET_MODEL) if gistnet == "auto" else gistnet


def _embedded_for(base: FrozenBase, name: str) -> str | None:
    """The embedded checkpoint ``name`` when it was trained for this base model, else None."""
    try:
        meta = read_checkpoint_meta(name)
    except (CheckpointError, AssetError):
        return None
    return name if meta["base_fingerprint"] == base.fingerprint else None


def resolve_focus(cfg: EngineConfig, base: FrozenBase, lensnet: str | None) -> tuple[EngineConfig, str | None]:
    """The product default ``focus="auto"`` made concrete, so a store records what it runs: LensNet when a
    checkpoint is given or the embedded one was trained for this base model (it closes the most of the
    recency-to-oracle gap measured, docs/focus_v2.md), else ``lexical`` (training-free, any base model)."""
    if cfg.focus != "auto":
        return cfg, lensnet
    if lensnet is None:
        lensnet = _embedded_for(base, LENSNET_MODEL)
    return cfg.replace(focus="lensnet" if lensnet is not None else "lexical"), lensnet


def make_compressor(base: FrozenBase, gistnet: str | None, lod2: str | None = None):
    """Mean pooling without a checkpoint; GistNet's compressor with one (the checkpoint must exist). LOD2 comes
    from ``lod2`` (a stacked LOD2 checkpoint), else the checkpoint's own trained level 2, else mean pooling."""
    if gistnet is None:
        if lod2 is not None:
            raise CheckpointError(f"gistnet_lod2={lod2!r} needs the LOD1 GistNet checkpoint it was trained on")
        return MeanPoolCompressor.from_base(base)
    read_checkpoint_meta(gistnet)  # clear error for a missing/malformed checkpoint directory
    from megacontext.gistnet.compressor import GistCompressor

    return GistCompressor.load(gistnet, base, lod2=lod2)  # refuses checkpoints trained for another base model


def make_focus(cfg: EngineConfig, base: FrozenBase, lensnet: str | None):
    if cfg.focus == "lensnet":
        if lensnet is None:
            raise CheckpointError("focus='lensnet' needs a LensNet checkpoint directory (lensnet=...)")
        read_checkpoint_meta(lensnet)
        from megacontext.focus.lens import LensPolicy

        return LensPolicy.load(lensnet, base)
    return make_policy(cfg.focus)


def recorded_path(p) -> str | None:
    """How a store records a model: an embedded name as the name (found again after a reinstall or on another
    machine, see :mod:`megacontext.core.assets`), a path as an absolute path."""
    if p is None or (str(p) in EMBEDDED and not Path(p).exists()):
        return None if p is None else str(p)
    return str(Path(p).expanduser().resolve())


def positions_for(cfg: EngineConfig, base: FrozenBase) -> EngineConfig:
    """The config with the position mode this base model can read: compact positions for a learned absolute
    position table or a model that takes no ``position_ids``; a budget past the table is refused."""
    limit = base.position_limit
    if cfg.wc.position_mode == "absolute" and (limit is not None or not base.takes_positions):
        why = f"a learned absolute position table of {limit} positions" if limit is not None else \
            "no position_ids (ALiBi or similar)"
        log.warning("base model %s has %s: using position_mode='compact' (slots numbered 0..T-1)", base.name, why)
        cfg = cfg.replace(wc=cfg.wc.replace(position_mode="compact"))
    if limit is not None and cfg.wc.w_max + cfg.k > limit:
        raise ValueError(f"w_max + k = {cfg.wc.w_max + cfg.k} slots exceed the {limit} positions of base model "
                         f"{base.name!r}'s learned position table; set w_max <= {limit - cfg.k}")
    return cfg
