"""Python API: a persistent memory (store directory + base model + checkpoints) you can talk to.

    with MegaContext.create("stores/notes") as mc:      # the embedded base-llama-19m-v2; any HF causal LM works
        mc.ingest(open("book.txt").read())
        print(mc.generate("The name of the ship was", max_new_tokens=16))
    with MegaContext.open("stores/notes") as mc:       # same memory, same working context
        print(mc.score("Some text to evaluate.").mean_nll)

Store directory = the tree's files (``LOD*.ctx``, ``meta.json``, ``LOCK``, owned by :mod:`megacontext.tree`)
plus the engine's: ``engine.json`` (format version, engine config, base model path + fingerprint, checkpoint
paths, step counter) and ``wc.safetensors`` (the working-context tiling). ``save()`` writes both atomically
(temp file + rename); reopening restores the WC exactly, so the next-token distribution is the same.

Errors are raised before anything is modified: a directory that is not a store, a base model whose
fingerprint differs from the one the store was built with, missing or mismatched checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megacontext.base import FrozenBase
from megacontext.core.assets import BASE_MODEL, EMBEDDED, GISTNET_MODEL, AssetError
from megacontext.core.checkpoint import CheckpointError, read_checkpoint_meta
from megacontext.focus.registry import make_policy
from megacontext.runtime.engine import Engine, EngineConfig, ScoreResult
from megacontext.runtime.sampling import SamplingConfig
from megacontext.runtime.telemetry import Telemetry
from megacontext.tree import MeanPoolCompressor, MegaContextTree, TreeConfig
from megacontext.wc import WorkingContext, WorkingContextError

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.json"
WC_FILE = "wc.safetensors"
TELEMETRY_FILE = "telemetry.jsonl"
FORMAT_VERSION = 1


class StoreError(ValueError):
    """A directory is not a MegaContext store, or its engine state is damaged or inconsistent."""


def _load_base(base, device, dtype) -> FrozenBase:
    if isinstance(base, FrozenBase):
        return base
    return FrozenBase.load(str(base or BASE_MODEL), device=device, dtype=dtype)


def resolve_gistnet(base: FrozenBase, gistnet: str | None) -> str | None:
    """``"auto"`` -> the embedded GistNet (its name) when it was trained for this base model, else None (mean
    pooling)."""
    if gistnet != "auto":
        return gistnet
    try:
        meta = read_checkpoint_meta(GISTNET_MODEL)
    except (CheckpointError, AssetError):
        return None
    return GISTNET_MODEL if meta["base_fingerprint"] == base.fingerprint else None


def _compressor(base: FrozenBase, gistnet: str | None, lod2: str | None = None):
    """Mean pooling without a checkpoint; GistNet's compressor with one (the checkpoint must exist). LOD2 comes
    from ``lod2`` (a stacked LOD2 checkpoint), else the checkpoint's own trained level 2, else mean pooling."""
    if gistnet is None:
        if lod2 is not None:
            raise CheckpointError(f"gistnet_lod2={lod2!r} needs the LOD1 GistNet checkpoint it was trained on")
        return MeanPoolCompressor.from_base(base)
    read_checkpoint_meta(gistnet)  # clear error for a missing/malformed checkpoint directory
    from megacontext.gistnet.compressor import GistCompressor

    return GistCompressor.load(gistnet, base, lod2=lod2)  # refuses checkpoints trained for another base model


def _policy(cfg: EngineConfig, base: FrozenBase, lensnet: str | None):
    if cfg.focus == "lensnet":
        if lensnet is None:
            raise CheckpointError("focus='lensnet' needs a LensNet checkpoint directory (lensnet=...)")
        read_checkpoint_meta(lensnet)
        from megacontext.focus.lens import LensPolicy

        return LensPolicy.load(lensnet, base)
    return make_policy(cfg.focus)


def _abs(p) -> str | None:
    """How a store records a model: an embedded name as the name (found again after a reinstall or on another
    machine, see :mod:`megacontext.core.assets`), a path as an absolute path."""
    if p is None or (str(p) in EMBEDDED and not Path(p).exists()):
        return None if p is None else str(p)
    return str(Path(p).expanduser().resolve())


class MegaContext:
    """A memory: ingest text, generate from it, score text under it; persists in a store directory."""

    def __init__(self, root: Path, base: FrozenBase, tree: MegaContextTree, engine: Engine, meta: dict):
        self.root, self.base, self.tree, self.engine, self._meta = root, base, tree, engine, meta
        self._closed = False

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, store: str | Path, base: str | FrozenBase | None = None, *, gistnet: str | None = "auto",
               gistnet_lod2: str | None = None, lensnet: str | None = None, config: EngineConfig | None = None,
               device: str | None = None, dtype: str | None = None, durable: bool = True) -> MegaContext:
        """A new, empty memory in ``store`` (which must not exist or be empty). ``gistnet``: a checkpoint,
        None for mean-pooled gists, or "auto": the embedded ``gistnet-19m-v2`` when it was trained for
        this base model, else mean pooling. ``gistnet_lod2``: a LOD2 checkpoint trained on that GistNet
        (``train gistnet --level 2 --lod1 ...``); without it LOD2 gists are mean-pooled LOD1 gists unless
        the GistNet checkpoint trained its own level 2."""
        root = Path(store)
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{str(root)!r} exists and is not empty; open it or choose a new directory")
        cfg = config or EngineConfig()
        fb = _load_base(base, device, dtype)
        gistnet = resolve_gistnet(fb, gistnet)
        policy = _policy(cfg, fb, lensnet)
        comp = _compressor(fb, gistnet, gistnet_lod2)
        tree = MegaContextTree.create(root, fb.d_model, fb.fingerprint, comp, config=TreeConfig(durable=durable))
        meta = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(),
                "base": {"path": fb.name if isinstance(base, FrozenBase) else _abs(base or BASE_MODEL),
                         "fingerprint": fb.fingerprint},
                "gistnet": _abs(gistnet), "gistnet_lod2": _abs(gistnet_lod2), "lensnet": _abs(lensnet), "step": 0}
        engine = Engine(fb, tree, cfg, policy, telemetry=Telemetry(root / TELEMETRY_FILE))
        mc = cls(root, fb, tree, engine, meta)
        mc.save()
        return mc

    @classmethod
    def open(cls, store: str | Path, base: str | FrozenBase | None = None, *, gistnet: str | None = None,
             lensnet: str | None = None, config: EngineConfig | None = None, device: str | None = None,
             dtype: str | None = None, durable: bool = True, readonly: bool = False) -> MegaContext:
        """Reopen a memory. Base model and checkpoints default to the ones recorded in the store;
        ``config`` may change run-time settings (e.g. ``debug``) but not the budget of an existing WC."""
        root = Path(store)
        meta = read_engine_meta(root)
        rec_base = meta["base"]
        fb = _load_base(base or rec_base["path"], device, dtype)
        if fb.fingerprint != rec_base["fingerprint"]:
            raise StoreError(f"store {str(root)!r} was built with base model {rec_base['path']!r} (fingerprint "
                             f"{rec_base['fingerprint']}), but the base model given has fingerprint "
                             f"{fb.fingerprint}; open it with the same base model")
        cfg = config or EngineConfig.from_dict(meta["config"])
        if cfg.wc.to_dict() != meta["config"]["wc"]:
            raise StoreError(f"the store's working context was built with {meta['config']['wc']}; "
                             f"config.wc={cfg.wc.to_dict()} differs (create a new store to change the budget)")
        gistnet = gistnet or meta.get("gistnet")
        lod2 = meta.get("gistnet_lod2") if gistnet == meta.get("gistnet") else None
        lensnet = lensnet or meta.get("lensnet")
        comp = _compressor(fb, gistnet, lod2)
        policy = _policy(cfg, fb, lensnet)
        tree = MegaContextTree.open(root, comp, fb.fingerprint, readonly=readonly,
                                    config=TreeConfig(durable=durable))
        try:
            wc = _load_wc(root, cfg, tree.num_tokens)
        except BaseException:
            tree.close()
            raise
        tel = Telemetry(None if readonly else root / TELEMETRY_FILE)
        engine = Engine(fb, tree, cfg, policy, wc=wc, telemetry=tel, step=int(meta.get("step", 0)))
        meta.update(gistnet=_abs(gistnet), gistnet_lod2=_abs(lod2), lensnet=_abs(lensnet), config=cfg.to_dict())
        return cls(root, fb, tree, engine, meta)

    # ------------------------------------------------------------------ use
    def _ids(self, text_or_ids) -> torch.Tensor:
        if isinstance(text_or_ids, str):
            return torch.tensor(self.base.encode(text_or_ids), dtype=torch.long)
        return torch.as_tensor(text_or_ids, dtype=torch.long).reshape(-1)

    def ingest(self, text_or_ids, progress: bool = False) -> int:
        """Append text (or token ids) to the memory; returns the number of tokens added."""
        ids = self._ids(text_or_ids)
        self.engine.ingest(ids, progress=progress)
        return ids.numel()

    def score(self, text_or_ids, progress: bool = False) -> ScoreResult:
        """Streaming per-token NLL of the text under the memory (the text is appended to it)."""
        return self.engine.score(self._ids(text_or_ids), progress=progress)

    def generate_ids(self, prompt, sampling: SamplingConfig | None = None) -> Iterator[int]:
        return self.engine.generate(self._ids(prompt), sampling)

    def generate(self, prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: tuple[str, ...] = (), stream: bool = False,
                 on_text: Callable[[str], None] | None = None) -> str | Iterator[str]:
        """Continue ``prompt`` from the memory. ``stream=True`` returns an iterator of text pieces;
        ``on_text`` is called with every piece as it is produced. Otherwise returns the whole text."""
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, stop_strings=tuple(stop))
        pieces = self._text_pieces(self.generate_ids(prompt, cfg), cfg.stop_strings, on_text)
        return pieces if stream else "".join(pieces)

    def _text_pieces(self, ids: Iterator[int], stop: tuple[str, ...], on_text) -> Iterator[str]:
        got: list[int] = []
        emitted = ""
        for tok in ids:
            got.append(tok)
            text = self.base.decode(got)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
                continue
            hit = min((text.find(s) + len(s) for s in stop if s in text), default=None)
            if hit is not None:
                text = text[:hit]
            piece, emitted = text[len(emitted):], text
            if piece:
                if on_text is not None:
                    on_text(piece)
                yield piece
            if hit is not None:
                ids.close()  # type: ignore[attr-defined]  # stop the engine's generator now
                return

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """Commit the tree and write the engine state (config, step, WC tiling) atomically."""
        if not self.tree.writable:
            raise StoreError(f"store {str(self.root)!r} is open read-only; nothing to save")
        self.tree.flush()
        wc = self.engine.wc
        tmp = self.root / (WC_FILE + ".tmp")
        save_file(wc.state_dict(), str(tmp))
        os.replace(tmp, self.root / WC_FILE)
        self._meta["step"] = self.engine.step
        self._meta["num_tokens"] = wc.num_tokens
        tmp = self.root / (ENGINE_FILE + ".tmp")
        tmp.write_text(json.dumps(self._meta, indent=1, sort_keys=True))
        os.replace(tmp, self.root / ENGINE_FILE)

    def close(self) -> dict:
        """Save (when writable), close the tree, end the telemetry log; returns the telemetry summary."""
        if self._closed:
            return {}
        self._closed = True
        if self.tree.writable:
            self.save()
        summary = self.engine.telemetry.close(self.engine.timer.totals)
        self.tree.close()
        return summary

    def __enter__(self) -> MegaContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_tokens(self) -> int:
        return self.engine.num_tokens

    def __repr__(self) -> str:
        return f"MegaContext({str(self.root)!r}, {self.engine.wc!r}, focus={self.engine.policy.name})"


def read_engine_meta(root: Path) -> dict:
    if not root.is_dir():
        raise StoreError(f"store {str(root)!r} does not exist (create it with MegaContext.create)")
    path = root / ENGINE_FILE
    if not path.is_file():
        raise StoreError(f"{str(root)!r} is not a MegaContext store: no {ENGINE_FILE} in it")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: invalid JSON ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: format_version={meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("config", "base"):
        if key not in meta:
            raise StoreError(f"{path}: missing field {key!r}")
    return meta


def _load_wc(root: Path, cfg: EngineConfig, num_tokens: int) -> WorkingContext:
    path = root / WC_FILE
    if not path.is_file():
        raise StoreError(f"{str(root)!r} has no {WC_FILE}: the working-context state is missing")
    try:
        tensors = load_file(str(path))
        held = int(tensors["num_tokens"][0])
    except (KeyError, OSError, RuntimeError, SafetensorError) as e:
        raise StoreError(f"{path}: damaged working-context state ({e})") from e
    if held > num_tokens:
        raise StoreError(f"{path}: the working context covers {held} tokens but the tree holds only {num_tokens}")
    try:
        wc = WorkingContext.from_state_dict(cfg.wc, tensors)
    except WorkingContextError as e:
        raise StoreError(f"{path}: working-context state is not a legal tiling: {e}") from e
    if held < num_tokens:  # tokens committed after the last save (e.g. a crash): bring the WC up by recency
        log.warning("%s: tree holds %d tokens, saved WC covers %d; syncing the WC by recency", root, num_tokens,
                    held)
        wc.sync(num_tokens)
    return wc
