"""The engine's state on disk, next to the tree: ``engine.json`` and ``wc.safetensors``, and what reopening a
store after a crash reports (:class:`Recovery`).

- ``engine.json``: format version, engine config, base model path + fingerprint, checkpoint paths, the refocus
  step counter, ``num_tokens`` (the history length at the last flush: what the last session acknowledged),
  ``writer_open`` (true while a writer has the store open; left true by a crash) and ``checksum`` (CRC-32 of
  the canonical JSON of the other fields). Files written before the checksum and the flag existed are read.
- ``wc.safetensors``: the working-context tiling (:meth:`megacontext.wc.WorkingContext.state_dict`) with a
  BLAKE2b digest of its tensors in the safetensors metadata.

Both are written atomically (temp file, fsync, rename, fsync of the directory when ``durable``), the tiling
first, so a crash leaves either the old or the new version of each, never a torn one. The tiling is derived
state: a saved tiling older than the tree (the tree committed more before the crash) is brought up to date by
the recency rule, and a missing one is rebuilt by it; both are reported. A damaged one is refused (deleting it
is the fix, named in the message).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from megacontext.tree.layout import META
from megacontext.tree.level_file import fsync_dir
from megacontext.wc import WorkingContext, WorkingContextConfig, WorkingContextError

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.json"
WC_FILE = "wc.safetensors"
TELEMETRY_FILE = "telemetry.jsonl"
FORMAT_VERSION = 1
_WC_KEYS = ("levels", "indices", "born", "origin", "num_tokens", "wc_step")


class StoreError(ValueError):
    """A directory is not a MegaContext store, or its engine state is damaged or inconsistent."""


def atomic_write(path: Path, data: bytes, durable: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


# ---------------------------------------------------------------------- the store directory
def incomplete_store_message(root: Path) -> str:
    return (f"{str(root)!r} is an incomplete store: its tree exists but {ENGINE_FILE} does not (a create "
            f"interrupted before stores were created atomically, or a deleted {ENGINE_FILE}); restore "
            f"{ENGINE_FILE} from a copy, or delete the directory and create the store again")


def check_new_store_path(root: Path) -> None:
    """Refuse a store path that is a file or a non-empty directory (naming the half-made store case)."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {str(root)!r} is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if (root / META).exists() and not (root / ENGINE_FILE).exists():
            raise StoreError(incomplete_store_message(root))
        raise StoreError(f"{str(root)!r} exists and is not empty; open it or choose a new directory")


def engine_checksum(meta: dict) -> int:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def write_engine_meta(root: Path, meta: dict, durable: bool) -> None:
    meta = {**meta, "format_version": FORMAT_VERSION}
    meta["checksum"] = engine_checksum(meta)
    atomic_write(root / ENGINE_FILE, json.dumps(meta, indent=1, sort_keys=True).encode(), durable)


def read_engine_meta(root: Path) -> dict:
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {str(root)!r} is not a directory")
    if not root.is_dir():
        raise StoreError(f"store {str(root)!r} does not exist (create it with MegaContext.create)")
    path = root / ENGINE_FILE
    if not path.is_file():
        if (root / META).exists():
            raise StoreError(incomplete_store_message(root))
        raise StoreError(f"{str(root)!r} is not a MegaContext store: no {ENGINE_FILE} in it")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise StoreError(f"{path}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: format_version={meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    if "checksum" in meta and meta["checksum"] != engine_checksum(meta):
        raise StoreError(f"{path}: damaged (its checksum does not match its contents)")
    for key in ("config", "base"):
        if key not in meta:
            raise StoreError(f"{path}: missing field {key!r}")
    return meta


# ---------------------------------------------------------------------- the working-context tiling
def wc_digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in _WC_KEYS:
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_wc(root: Path, wc: WorkingContext, durable: bool) -> None:
    tensors = wc.state_dict()
    tmp = root / (WC_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"blake2b": wc_digest(tensors)})
    if durable:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, root / WC_FILE)
    if durable:
        fsync_dir(root)


def read_wc(root: Path) -> dict[str, Tensor]:
    """The saved tiling's tensors, checked against their digest; StoreError naming the fix when damaged."""
    path = root / WC_FILE
    fix = f"delete {path} and reopen to rebuild the working context by recency"
    try:
        with safe_open(str(path), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            digest = (fh.metadata() or {}).get("blake2b")
        missing = sorted(set(_WC_KEYS) - set(tensors))
        if missing:
            raise StoreError(f"{path}: damaged working-context state (no tensor(s) {missing}); {fix}")
        if digest is not None and digest != wc_digest(tensors):
            raise StoreError(f"{path}: damaged working-context state (its digest does not match); {fix}")
    except StoreError:
        raise
    except (KeyError, OSError, RuntimeError, SafetensorError, ValueError) as e:
        raise StoreError(f"{path}: damaged working-context state ({e}); {fix}") from e
    return tensors


def load_wc(root: Path, cfg: WorkingContextConfig, num_tokens: int) -> tuple[WorkingContext, list[str]]:
    """The saved working context over a tree of ``num_tokens`` tokens, and notes on what was repaired: a tiling
    older than the tree is synced by recency, a missing or longer one rebuilt by recency."""
    path = root / WC_FILE
    if not path.is_file():
        log.warning("%s: no %s; rebuilding the working context by recency", root, WC_FILE)
        return WorkingContext.assemble(num_tokens, cfg), [f"{WC_FILE}: missing; working context rebuilt by recency"]
    tensors = read_wc(root)
    held = int(tensors["num_tokens"][0])
    try:
        wc = WorkingContext.from_state_dict(cfg, tensors)
    except WorkingContextError as e:
        raise StoreError(f"{path}: working-context state is not a legal tiling: {e}; delete it and reopen to "
                         "rebuild the working context by recency") from e
    if held > num_tokens:  # only after a power loss with durable=False: the derived state is rebuilt
        log.warning("%s: the saved working context covers %d tokens, the tree %d; rebuilding it by recency", root,
                    held, num_tokens)
        return WorkingContext.assemble(num_tokens, cfg), [
            f"{WC_FILE}: covered {held} tokens, more than the tree's {num_tokens}; rebuilt by recency"]
    if held < num_tokens:  # tokens committed after the last save (a crash): bring the WC up by recency
        log.warning("%s: tree holds %d tokens, saved WC covers %d; syncing the WC by recency", root, num_tokens, held)
        wc.sync(num_tokens)
        return wc, [f"{WC_FILE}: covered {held} tokens; synced by recency to the tree's {num_tokens}"]
    return wc, []


# ---------------------------------------------------------------------- what a reopen after a crash found
@dataclass(frozen=True)
class Recovery:
    """What a writable reopen found and repaired: after the store's last writer did not close it (killed,
    crashed, power lost: ``crashed``), or when a file had to be repaired (a missing working-context file).

    ``acknowledged`` is the history length at that writer's last completed ``flush()`` (every ``ingest``,
    ``score`` and ``generate`` ends with one by default), i.e. what it had acknowledged; ``num_tokens`` what the
    memory holds now. Tokens past the acknowledged ones were committed by the commit interval before the crash
    and are kept; ``lost`` counts acknowledged tokens that are missing (0 unless ``durable=False`` met a power
    loss, or files were damaged)."""

    num_tokens: int
    acknowledged: int | None  # None: written by a version that did not record it
    discarded: tuple[str, ...] = ()  # what reopening dropped or repaired (uncommitted rows, a stale tail, ...)
    crashed: bool = True  # the last writer did not close the store

    @property
    def kept_unacknowledged(self) -> int:
        return max(self.num_tokens - self.acknowledged, 0) if self.acknowledged is not None else 0

    @property
    def lost(self) -> int:
        return max(self.acknowledged - self.num_tokens, 0) if self.acknowledged is not None else 0

    def __str__(self) -> str:
        ack = "an unknown number of" if self.acknowledged is None else f"{self.acknowledged:,}"
        how = "the last writer did not close the store" if self.crashed else "reopening repaired the store"
        text = (f"{how}: recovered {self.num_tokens:,} tokens ({ack} acknowledged by the last flush, "
                f"{self.kept_unacknowledged:,} committed after it")
        text += f"; {self.lost:,} ACKNOWLEDGED TOKENS LOST)" if self.lost else ", nothing acknowledged lost)"
        return text + ("; " + "; ".join(self.discarded) if self.discarded else "")
