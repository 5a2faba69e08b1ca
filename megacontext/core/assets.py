"""Embedded models: where the small base model and its trained checkpoints are found at run time.

The package ships three model folders as package data (``megacontext/assets/models/``):
``base-llama-19m-v2`` (the stand-in frozen base), ``gistnet-19m-v2`` and ``lensnet-19m-v2-lex`` (checkpoints trained
for it). Code names them by name, never by a path relative to the repository, so a non-editable
install run from any directory finds them. v2 of the base (``standin/``, docs/results/standin_base.md)
replaced v1 (``base-llama-19m``, with ``gistnet-19m`` and ``lensnet-19m`` made for it) as the embedded
default; v1 stays in git history and in ``../shared/models/`` for comparisons.

Resolution order of an embedded name
1. ``$MEGACONTEXT_MODELS/<name>`` when the environment variable is set (a directory holding model
   folders: lets a GPU machine or a slim install keep the weights elsewhere);
2. the packaged folder ``megacontext/assets/models/<name>``.
A name found in neither raises :class:`AssetError` naming both places.

:func:`resolve` is the one entry point for user-given model arguments (CLI flags, YAML configs, API
arguments): an embedded name that is not also an existing local path becomes its folder; anything else
(a directory, a hub id) passes through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MEGACONTEXT_MODELS"
PACKAGED = Path(__file__).resolve().parents[1] / "assets" / "models"
BASE_MODEL = "base-llama-19m-v2"
GISTNET_MODEL = "gistnet-19m-v2"
LENSNET_MODEL = "lensnet-19m-v2-lex"
EMBEDDED = (BASE_MODEL, GISTNET_MODEL, LENSNET_MODEL)


class AssetError(FileNotFoundError):
    """An embedded model is in neither $MEGACONTEXT_MODELS nor the installed package."""


def _places(name: str) -> list[Path]:
    env = os.environ.get(ENV_VAR)
    return ([Path(env).expanduser() / name] if env else []) + [PACKAGED / name]


def embedded(name: str) -> Path:
    """The folder of embedded model ``name`` (see the module docstring for the search order)."""
    if name not in EMBEDDED:
        raise AssetError(f"{name!r} is not an embedded model; expected one of {list(EMBEDDED)}")
    places = _places(name)
    for p in places:
        if p.is_dir():
            return p
    env = os.environ.get(ENV_VAR)
    where = f"${ENV_VAR}={env!r} (no {name}/ in it)" if env else f"${ENV_VAR} (not set)"
    raise AssetError(f"embedded model {name!r} not found: looked in {where} and in the package ({PACKAGED / name}); "
                     f"set {ENV_VAR} to a directory holding {name}/ or reinstall the package with its data")


def resolve(spec: str | os.PathLike) -> str:
    """A model argument as a loadable string: an embedded name -> its folder; a path or hub id unchanged."""
    s = str(spec)
    if s in EMBEDDED and not Path(s).exists():
        return str(embedded(s))
    return s
