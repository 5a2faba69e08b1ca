"""ModelCatalog: the model directories a server allows, named by their directory name, and the shared bases.

A client never names a path: it picks a base model, a GistNet and a LensNet by *name* from the server's
allow-list (``--models``; default: the embedded ones). A directory holding a MegaContext checkpoint
(``config.json`` with a ``kind``) is a GistNet or LensNet; any other directory is a Hugging Face base model.

Invariants
- One :class:`FrozenBase` per base directory per process, loaded once (the default one at start-up, others
  on first use) and shared by every session built on it.
- A session is only (re)opened when every model its store records is still on the allow-list, so a store
  cannot smuggle in a path the server does not allow.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from megacontext.base import FrozenBase
from megacontext.core.assets import EMBEDDED, AssetError, embedded
from megacontext.core.checkpoint import CheckpointError, read_checkpoint_meta
from megacontext.core.config import ConfigError
from megacontext.serve.errors import bad_request

log = logging.getLogger(__name__)

KINDS = ("base", "gistnet", "lensnet")


def embedded_models() -> list[Path]:
    """The models shipped with the package (the base, and its GistNet and LensNet when present)."""
    found = []
    for name in EMBEDDED:
        try:
            found.append(embedded(name))
        except AssetError:
            continue
    return found


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path  # resolved
    kind: str  # base | gistnet | lensnet
    base_fingerprint: str | None = None  # checkpoints: the base model they were trained for

    def public(self) -> dict:
        return {"name": self.name, "kind": self.kind, "base_fingerprint": self.base_fingerprint}


def _classify(path: Path) -> ModelEntry:
    if not path.is_dir():
        raise ConfigError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} is neither a Hugging Face model nor a MegaContext checkpoint "
                          "(no config.json)")
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError:  # no 'kind' etc.: a Hugging Face model directory
        return ModelEntry(path.name, path, "base")
    if meta["kind"] not in ("gistnet", "lensnet"):
        raise ConfigError(f"{str(path)!r} holds a {meta['kind']!r} checkpoint; expected gistnet or lensnet")
    return ModelEntry(path.name, path, meta["kind"], meta["base_fingerprint"])


class ModelCatalog:
    """Allowed model directories by name, and the loaded base models."""

    def __init__(self, paths: tuple[str, ...] | list[str] = (), default_base: str = "", device: str | None = None,
                 dtype: str | None = None):
        dirs = [Path(p).expanduser().resolve() for p in paths] or [p.resolve() for p in embedded_models()]
        self.entries: dict[str, ModelEntry] = {}
        for d in dirs:
            e = _classify(d)
            if e.name in self.entries and self.entries[e.name].path != e.path:
                raise ConfigError(f"two allowed models are named {e.name!r} ({self.entries[e.name].path} and "
                                  f"{e.path}); model names (directory names) must be unique")
            self.entries[e.name] = e
        bases = [e.name for e in self.entries.values() if e.kind == "base"]
        if not bases:
            raise ConfigError(f"no base model among the allowed models {sorted(self.entries)}")
        if default_base and default_base not in bases:
            raise ConfigError(f"base={default_base!r} is not an allowed base model; expected one of {bases}")
        self.default_base = default_base or bases[0]
        self.device, self.dtype = device, dtype
        self._bases: dict[str, FrozenBase] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lookup
    def get(self, kind: str, name: str) -> ModelEntry:
        e = self.entries.get(name)
        if e is None or e.kind != kind:
            allowed = sorted(n for n, x in self.entries.items() if x.kind == kind)
            raise bad_request(f"{kind} {name!r} is not allowed by this server; expected one of {allowed}")
        return e

    def by_path(self, path: str | None) -> ModelEntry | None:
        if path is None:
            return None
        p = Path(path).expanduser().resolve()
        return next((e for e in self.entries.values() if e.path == p), None)

    def for_base(self, kind: str, fingerprint: str) -> ModelEntry | None:
        """The first allowed checkpoint of ``kind`` trained for the base model with this fingerprint."""
        return next((e for e in self.entries.values() if e.kind == kind and e.base_fingerprint == fingerprint), None)

    def listing(self) -> list[dict]:
        return [e.public() for e in self.entries.values()]

    # ------------------------------------------------------------------ shared base models
    def base(self, name: str | None = None) -> FrozenBase:
        """The loaded base model ``name`` (default: the server's default), loaded on first use."""
        entry = self.get("base", name or self.default_base)
        with self._lock:  # loads are rare; holding the lock keeps two threads from loading the same model
            fb = self._bases.get(entry.name)
            if fb is None:
                log.info("loading base model %s", entry.path)
                fb = FrozenBase.load(str(entry.path), device=self.device, dtype=self.dtype)
                if fb.tokenizer is None:
                    raise ConfigError(f"base model {entry.name!r} has no tokenizer; the server needs text I/O")
                self._bases[entry.name] = fb
            return fb
