"""Python API: a persistent memory (store directory + base model + checkpoints) you can talk to.

    with MegaContext.create("stores/notes") as mc:      # the embedded base-llama-19m-v2; any HF causal LM works
        mc.ingest(open("book.txt").read())
        print(mc.generate("The name of the ship was", max_new_tokens=16))
    with MegaContext.open("stores/notes") as mc:       # same memory, same working context
        print(mc.score("Some text to evaluate.").mean_nll)

Store directory = the tree's files (``LOD*.ctx``, ``LOD*.sum``, ``meta.json``, ``LOCK``, owned by
:mod:`megacontext.tree`) plus the engine's (``engine.json``, ``wc.safetensors``, :mod:`megacontext.runtime.persist`)
and the telemetry log. A store is created in a temporary sibling directory and renamed into place, so a crash
during ``create`` leaves no half-made store.

Durability contract (``docs/reliability.md``)
- ``flush()``: when it returns, everything ingested so far is durable: the tree is committed (fsynced when
  ``durable=True``, the default) and the working-context state saved, so reopening restores it exactly.
- ``ingest()``, ``score()`` and ``generate()`` (when its iterator finishes or is closed) end with a ``flush()``
  unless the memory was opened with ``autoflush=False``: what they returned is on disk.
- While a call runs, the tree commits at least every ``TreeConfig.commit_tokens`` tokens and every
  ``commit_seconds`` seconds, so a crash in the middle of a long call loses at most that much of its tail.
- ``close()`` (and leaving the ``with`` block, also on an exception) flushes and releases the store; a close
  whose flush fails still releases the lock.
- Reopening a store whose writer died reports what it recovered: ``mc.recovered`` (a
  :class:`~megacontext.runtime.persist.Recovery`, None after a clean close) and a log line.

Errors are raised before anything is modified: a path that is not a store, a base model whose fingerprint
differs from the one the store was built with, missing or mismatched checkpoints, token ids outside the
vocabulary or not integers, a history that would outgrow the working context's reach, a read-only store.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from megacontext.base import FrozenBase
from megacontext.core.assets import BASE_MODEL
from megacontext.runtime.components import (
    load_base,
    make_compressor,
    make_focus,
    positions_for,
    resolve_focus,
    resolve_gistnet,
)
from megacontext.runtime.components import recorded_path as _rec
from megacontext.runtime.engine import Engine, EngineConfig, ScoreResult
from megacontext.runtime.persist import (
    ENGINE_FILE,
    FORMAT_VERSION,
    TELEMETRY_FILE,
    WC_FILE,
    Recovery,
    StoreError,
    check_new_store_path,
    load_wc,
    read_engine_meta,
    save_wc,
    write_engine_meta,
)
from megacontext.runtime.sampling import SamplingConfig
from megacontext.runtime.telemetry import Telemetry
from megacontext.tree import MegaContextTree, StoreMismatchError, TreeConfig
from megacontext.tree.history import as_token_array
from megacontext.tree.level_file import fsync_dir
from megacontext.wc import BudgetError, WorkingContext

log = logging.getLogger(__name__)

__all__ = ["ENGINE_FILE", "FORMAT_VERSION", "TELEMETRY_FILE", "WC_FILE", "MegaContext", "Recovery", "StoreError",
           "read_engine_meta", "resolve_gistnet"]


class MegaContext:
    """A memory: ingest text, generate from it, score text under it; persists in a store directory."""

    def __init__(self, root: Path, base: FrozenBase, tree: MegaContextTree, engine: Engine, meta: dict,
                 autoflush: bool = True):
        self.root, self.base, self.tree, self.engine, self._meta = root, base, tree, engine, meta
        self.autoflush = autoflush
        self.recovered: Recovery | None = None  # set by open() when the last writer did not close the store
        self._closed = False

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, store: str | Path, base: str | FrozenBase | None = None, *, gistnet: str | None = "auto",
               gistnet_lod2: str | None = None, lensnet: str | None = None, config: EngineConfig | None = None,
               device: str | None = None, dtype: str | None = None, durable: bool = True,
               tree: TreeConfig | None = None, autoflush: bool = True) -> MegaContext:
        """A new, empty memory in ``store`` (which must not exist or be an empty directory). ``gistnet``: a
        checkpoint, None for mean-pooled gists, or "auto": the embedded ``gistnet-19m-v2`` when it was trained for
        this base model, else mean pooling. ``gistnet_lod2``: a LOD2 checkpoint trained on that GistNet
        (``train gistnet --level 2 --lod1 ...``); without it LOD2 gists are mean-pooled LOD1 gists unless
        the GistNet checkpoint trained its own level 2. ``tree``: store settings (commit interval, batching,
        fsync; ``durable`` is its shorthand). ``autoflush``: see the durability contract in the module doc."""
        root = Path(store)
        check_new_store_path(root)
        fb = load_base(base, device, dtype)
        cfg, lensnet = resolve_focus(positions_for(config or EngineConfig(), fb), fb, lensnet)
        gistnet = resolve_gistnet(fb, gistnet)
        policy = make_focus(cfg, fb, lensnet)
        comp = make_compressor(fb, gistnet, gistnet_lod2)
        tcfg = tree or TreeConfig(durable=durable)
        meta = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(),
                "base": {"path": fb.name if isinstance(base, FrozenBase) else _rec(base or BASE_MODEL),
                         "fingerprint": fb.fingerprint},
                "gistnet": _rec(gistnet), "gistnet_lod2": _rec(gistnet_lod2), "lensnet": _rec(lensnet), "step": 0,
                "num_tokens": 0, "writer_open": True}
        # built in a temporary sibling and renamed into place: a crash leaves no half-made store
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            MegaContextTree.create(tmp, fb.d_model, fb.fingerprint, comp, config=tcfg, vocab_size=fb.vocab_size) \
                .close()
            save_wc(tmp, WorkingContext(cfg.wc), tcfg.durable)
            write_engine_meta(tmp, meta, tcfg.durable)
            try:
                os.rename(tmp, root)  # replaces an empty directory, refuses a non-empty one
            except OSError as e:
                raise StoreError(f"{str(root)!r} appeared while the store was being created ({e})") from e
            if tcfg.durable:
                fsync_dir(root.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        t = MegaContextTree.open(root, comp, fb.fingerprint, config=tcfg)
        engine = Engine(fb, t, cfg, policy, telemetry=Telemetry(root / TELEMETRY_FILE, cfg=cfg.telemetry))
        return cls(root, fb, t, engine, meta, autoflush)

    @classmethod
    def open(cls, store: str | Path, base: str | FrozenBase | None = None, *, gistnet: str | None = None,
             lensnet: str | None = None, config: EngineConfig | None = None, device: str | None = None,
             dtype: str | None = None, durable: bool = True, readonly: bool = False, tree: TreeConfig | None = None,
             autoflush: bool = True, rebuild: bool = False) -> MegaContext:
        """Reopen a memory. Base model and checkpoints default to the ones recorded in the store; ``config`` may
        change run-time settings (e.g. ``debug``, ``telemetry``) but not the budget of an existing WC.
        ``rebuild=True`` converts a store made for another base model or GistNet: every gist is recomputed from
        the stored tokens (the tokens and the working context are kept). A writable open after a crash repairs
        the store and reports what it recovered in ``recovered``."""
        root = Path(store)
        meta = read_engine_meta(root)
        rec_base = meta["base"]
        fb = load_base(base or rec_base["path"], device, dtype)
        if fb.fingerprint != rec_base["fingerprint"] and not rebuild:
            raise StoreError(f"store {str(root)!r} was built with base model {rec_base['path']!r} (fingerprint "
                             f"{rec_base['fingerprint']}), but the base model given has fingerprint "
                             f"{fb.fingerprint}; open it with the same base model, or with rebuild=True "
                             "(CLI: --rebuild) to recompute its gists for this one")
        stored = EngineConfig.from_dict(meta["config"])
        cfg = positions_for(config or stored, fb)
        if cfg.wc.replace(position_mode=stored.wc.position_mode) != stored.wc:
            raise StoreError(f"the store's working context was built with {stored.wc.to_dict()}; "
                             f"config.wc={cfg.wc.to_dict()} differs (create a new store to change the budget)")
        gistnet = gistnet or meta.get("gistnet")
        lod2 = meta.get("gistnet_lod2") if gistnet == meta.get("gistnet") else None
        cfg, lensnet = resolve_focus(cfg, fb, lensnet or meta.get("lensnet"))
        comp = make_compressor(fb, gistnet, lod2)
        policy = make_focus(cfg, fb, lensnet)
        tcfg = tree or TreeConfig(durable=durable)
        try:
            t = MegaContextTree.open(root, comp, fb.fingerprint, readonly=readonly, config=tcfg, rebuild=rebuild)
        except StoreMismatchError as e:
            raise StoreError(f"{e} (CLI: --rebuild)") from e
        try:
            if t.vocab_size and fb.vocab_size < t.vocab_size:
                raise StoreError(f"store {str(root)!r} holds ids of a vocabulary of {t.vocab_size}; base model "
                                 f"{fb.name!r} has only {fb.vocab_size}")
            wc, notes = load_wc(root, cfg.wc, t.num_tokens)
            recovered = None
            if not readonly and (meta.get("writer_open") or t.recovery or notes):
                recovered = Recovery(t.num_tokens, meta.get("num_tokens"), tuple(t.recovery + notes),
                                     crashed=bool(meta.get("writer_open")))
                (log.error if recovered.lost else log.warning)("%s: %s", root, recovered)
            meta.update(gistnet=_rec(gistnet), gistnet_lod2=_rec(lod2), lensnet=_rec(lensnet), config=cfg.to_dict())
            if rebuild:
                meta["base"] = {"path": fb.name if isinstance(base, FrozenBase) else _rec(base or rec_base["path"]),
                                "fingerprint": fb.fingerprint}
            if not readonly:  # marks the store open for writing: a crash from here on is reported by the next open
                meta["writer_open"] = True
                write_engine_meta(root, meta, tcfg.durable)
        except BaseException:
            t.close()
            raise
        tel = Telemetry(None if readonly else root / TELEMETRY_FILE, cfg=cfg.telemetry)
        engine = Engine(fb, t, cfg, policy, wc=wc, telemetry=tel, step=int(meta.get("step", 0)))
        mc = cls(root, fb, t, engine, meta, autoflush)
        mc.recovered = recovered
        return mc

    # ------------------------------------------------------------------ checks made before anything is written
    def _require_writable(self) -> None:
        if self._closed:
            raise StoreError(f"store {str(self.root)!r} is closed")
        if not self.tree.writable:
            raise StoreError(f"store {str(self.root)!r} is open read-only")

    def _ids(self, text_or_ids) -> torch.Tensor:
        """Token ids of text, or validated ids: integers in ``[0, vocab)`` (refused otherwise, nothing changed)."""
        if isinstance(text_or_ids, str):
            ids = np.asarray(self.base.encode(text_or_ids), dtype=np.int64)
        else:
            ids = as_token_array(text_or_ids, self.base.vocab_size).astype(np.int64)
        return torch.from_numpy(ids)

    def _check_room(self, n_new: int, every_after: int | None = None) -> None:
        """Refuse (BudgetError) a call whose history lengths would not fit the working context: the engine syncs
        at every multiple of k and at the end of the call (generation: at every token past ``every_after``)."""
        n0 = self.num_tokens
        after = n0 + n_new
        k = self.engine.cfg.k
        if after > self.engine.wc.reach:  # rare (tiny budgets): check exactly the lengths the engine visits
            first = (n0 // k + 1) * k
            aligned = torch.arange(first, max(first, after), k)
            tail = torch.arange(every_after + 1, after + 1) if every_after is not None else torch.tensor([after])
            visited = torch.cat([aligned, tail])
        else:
            visited = None
        try:
            self.engine.wc.check_room(after, visited)
        except BudgetError as e:
            raise BudgetError(f"{n_new:,} more tokens would take the history to {after:,} tokens: {e}; nothing was "
                              "written (a new store with a larger w_max or a smaller recent_raw reaches further)") \
                from None

    # ------------------------------------------------------------------ use
    def ingest(self, text_or_ids, progress: bool = False) -> int:
        """Append text (or token ids) to the memory; returns the number of tokens added.

        Durability: with ``autoflush`` (the default) every token this call appended, and everything before it,
        is on disk when it returns. During the call the tree commits at least every ``commit_tokens`` tokens and
        ``commit_seconds`` seconds (see the module doc). A refused call (ids that are not integers or lie outside
        the vocabulary, a history past the reach, a read-only store) raises before anything is written."""
        self._require_writable()
        ids = self._ids(text_or_ids)
        self._check_room(ids.numel())
        self.engine.ingest(ids, progress=progress)
        self._autoflush()
        return ids.numel()

    def score(self, text_or_ids, progress: bool = False) -> ScoreResult:
        """Streaming per-token NLL of the text under the memory (the text is appended to it; durable on return
        as for :meth:`ingest`)."""
        self._require_writable()
        ids = self._ids(text_or_ids)
        self._check_room(ids.numel())
        res = self.engine.score(ids, progress=progress)
        self._autoflush()
        return res

    def generate_ids(self, prompt, sampling: SamplingConfig | None = None) -> Iterator[int]:
        """Generated token ids, one by one (prompt and output are appended to the memory; durable once the
        iterator finishes or is closed, as for :meth:`ingest`). Arguments are checked now, before iteration."""
        self._require_writable()
        ids = self._ids(prompt)
        cfg = sampling or SamplingConfig()
        self._check_room(ids.numel() + cfg.max_new_tokens, every_after=self.num_tokens + ids.numel())
        return self._flushing(self.engine.generate(ids, cfg))

    def _flushing(self, gen: Iterator[int]) -> Iterator[int]:
        try:
            yield from gen
        finally:
            gen.close()  # type: ignore[attr-defined]
            self._autoflush()

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
        try:
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
                    return
        finally:
            ids.close()  # type: ignore[attr-defined]  # stops the engine's generator and flushes

    # ------------------------------------------------------------------ persistence
    def flush(self) -> None:
        """Make everything ingested so far durable: on return the tree is committed (fsynced when ``durable``)
        and the engine state (working context, step counter) saved, so reopening restores this exact memory.
        Telemetry steps aggregated so far are written too, so readers of the log (``inspect``, the service's
        focus map) see every acknowledged step."""
        self._require_writable()
        self.tree.flush()
        self._save_state(writer_open=True)
        self.engine.telemetry.flush()

    def save(self) -> None:
        """Same as :meth:`flush` (the name older callers use)."""
        self.flush()

    def _autoflush(self) -> None:
        if self.autoflush and not self._closed and self.tree.writable:
            self.flush()

    def _save_state(self, writer_open: bool) -> None:
        durable = self.tree.config.durable
        wc = self.engine.wc
        save_wc(self.root, wc, durable)  # before engine.json: both are atomic, the tiling is derived state
        self._meta.update(step=self.engine.step, num_tokens=wc.num_tokens, writer_open=writer_open)
        write_engine_meta(self.root, self._meta, durable)

    def close(self) -> dict:
        """Flush (when writable), close the tree, end the telemetry log; returns the telemetry summary. The
        store is released even when the flush fails (the error is raised after)."""
        if self._closed:
            return {}
        self._closed = True
        summary: dict = {}
        try:
            if self.tree.writable:
                self.tree.flush()
                self._save_state(writer_open=False)
        finally:
            try:
                summary = self.engine.telemetry.close(self.engine.timer.totals)
            finally:
                self.tree.close()
        return summary

    def __enter__(self) -> MegaContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_tokens(self) -> int:
        return self.engine.num_tokens

    @property
    def reach(self) -> int:
        """Longest history this memory's working context can tile (beyond 10^14 tokens at the defaults)."""
        return self.engine.wc.reach

    def __repr__(self) -> str:
        return f"MegaContext({str(self.root)!r}, {self.engine.wc!r}, focus={self.engine.policy.name})"
