"""Checkpoints: ``model.safetensors`` (weights only, never pickled) + ``config.json``.

``config.json`` records the kind of network, its config, the base model's fingerprint and d_model, and
training metadata. Loading refuses a checkpoint whose fingerprint differs from the base model in hand,
because a gist or a score is only meaningful in the embedding space it was trained against.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megacontext.core.assets import resolve

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or made for another base model / network kind."""


def save_checkpoint(directory: str | Path, module: torch.nn.Module, *, kind: str, config: dict[str, Any],
                    base_fingerprint: str, d_model: int, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write weights + config (write to temp names, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "base_fingerprint": base_fingerprint,
        "d_model": d_model,
        **(extra or {}),
    }
    tmp_w, tmp_c = directory / (WEIGHTS + ".tmp"), directory / (CONFIG + ".tmp")
    save_file(state, str(tmp_w))
    tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_w, directory / WEIGHTS)
    os.replace(tmp_c, directory / CONFIG)
    return directory


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json; ``directory`` may be an embedded name (e.g. ``gistnet-19m-v2``)."""
    directory = Path(resolve(directory))
    cfg = directory / CONFIG
    if not cfg.is_file() or not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"{str(directory)!r} is not a checkpoint: expected {CONFIG} and {WEIGHTS} in it")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({e})") from e
    for key in ("kind", "config", "base_fingerprint", "d_model"):
        if key not in meta:
            raise CheckpointError(f"{cfg}: missing field {key!r}")
    return meta


def load_checkpoint(directory: str | Path, *, kind: str, base_fingerprint: str | None,
                    d_model: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict on CPU, meta). ``base_fingerprint=None`` skips the base-model check."""
    directory = resolve(directory)
    meta = read_checkpoint_meta(directory)
    if meta["kind"] != kind:
        raise CheckpointError(f"{str(directory)!r} holds a {meta['kind']!r} checkpoint, expected {kind!r}")
    if base_fingerprint is not None and meta["base_fingerprint"] != base_fingerprint:
        raise CheckpointError(
            f"{str(directory)!r} was trained for base model fingerprint {meta['base_fingerprint']}, "
            f"but the loaded base model has fingerprint {base_fingerprint}; retrain it for this base model"
        )
    if d_model is not None and meta["d_model"] != d_model:
        raise CheckpointError(f"{str(directory)!r} has d_model={meta['d_model']}, base model has {d_model}")
    state = load_file(str(Path(directory) / WEIGHTS), device="cpu")
    return state, meta
