"""SessionRegistry: one MegaContext store per session, a bounded LRU of open engines, one lock per session.

Layout: ``DATA_ROOT/sessions/<id>/store`` is the session's MegaContext store (owned by the API: tree,
``engine.json``, WC, telemetry) and ``DATA_ROOT/sessions/<id>/serve.json`` the server's own small state
(creation time, chat bookkeeping). Creation builds the whole session directory under a temporary name and
renames it into place, so a crash never leaves half a session; deletion renames it away before removing it.

Invariants
- Session ids match :data:`megacontext.serve.protocol.SESSION_ID`, so an id is always one plain path component
  under the data root; ids are checked before any path is built from them.
- Work on a session happens only inside :meth:`SessionRegistry.use`, which holds the session's lock: requests
  on one session are serialised, different sessions run concurrently.
- At most ``max_open`` engines stay open. Opening one more closes (saves) the least recently used sessions
  that are idle; a busy one is skipped, so the LRU may exceed its bound while they are busy rather than block,
  and is trimmed back as soon as a request ends.
- Every engine is opened with the store's cross-process lock; a session held by another process is refused
  with 423, never opened twice.
- :meth:`SessionRegistry.commit` is the only place where acknowledged work is made durable. It calls
  ``MegaContext.flush()`` (the durability contract of docs/reliability.md); engines are opened with
  ``autoflush=False`` so a request pays for one flush, not one per API call.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import statistics
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megacontext.api import ENGINE_FILE, EngineConfig, MegaContext, StoreError, read_engine_meta
from megacontext.serve.config import ServeConfig
from megacontext.serve.errors import ServeError, bad_request, not_found
from megacontext.serve.models import ModelCatalog
from megacontext.serve.protocol import SESSION_ID, SESSION_ID_RULE, valid_session_id
from megacontext.tree import StoreBusyError
from megacontext.tree.level_file import fsync_dir

log = logging.getLogger(__name__)

STORE, STATE = "store", "serve.json"
STORE_LOCK = "LOCK"  # the tree's cross-process lock file inside a store (megacontext.tree's flock)
_TMP_PREFIX = (".creating-", ".deleting-")
_SWEEP_AGE_S = 600  # a creation takes well under a second; older temporary directories are a crash's leftovers
# the working context needs about one slot per 1,024 tokens of history beyond its protected raw suffix and ~60
# slots of partial blocks (megacontext.wc.tiling.reach); the server stays 10% below that so no append can push a
# session past what its budget can tile
_SLOTS_OVERHEAD, _TOKENS_PER_SLOT, _MARGIN = 64, 1024, 0.9


def check_session_id(sid) -> str:
    if not valid_session_id(sid):
        raise bad_request(f"invalid session id {repr(sid)[:80]}: expected {SESSION_ID_RULE}")
    return sid


def capacity(cfg: EngineConfig, limit: int) -> int:
    """Most tokens a session with this engine config may hold."""
    reach = (cfg.wc.w_max - cfg.wc.recent_raw - _SLOTS_OVERHEAD) * _TOKENS_PER_SLOT * _MARGIN
    return max(0, min(limit, int(reach)))


@dataclass
class Session:
    """An open session: its engine, its server-side state and the names of the models it uses."""

    sid: str
    path: Path
    mc: MegaContext
    state: dict
    models: dict  # kind -> allowed model name (None when unused)
    capacity: int
    _saved_state: str = field(default="", repr=False)

    def info(self) -> dict:
        return {"id": self.sid, "open": True, "num_tokens": self.mc.num_tokens, "capacity": self.capacity,
                **self.models, "config": self.mc.engine.cfg.to_dict(), "created": self.state.get("created")}


class SessionRegistry:
    """Sessions under ``cfg.sessions_dir``: create, open (LRU), use (locked), commit, delete, close."""

    def __init__(self, cfg: ServeConfig, catalog: ModelCatalog):
        self.cfg, self.catalog = cfg, catalog
        self.root = cfg.sessions_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: OrderedDict[str, Session] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._reg = threading.Lock()  # guards _open, _locks and the counters; never held during model or disk work
        self.counters = {"opens": 0, "evictions": 0, "commits": 0}
        self._commit_ms: deque[float] = deque(maxlen=4096)  # the latest commits' durations
        self._sweep()

    def _sweep(self) -> None:
        """Remove what a crash left of a creation or a deletion (never a session: those names are not ids). Only
        old leftovers: another server on the same data root may be creating a session right now."""
        now = time.time()
        for p in self.root.iterdir():
            with contextlib.suppress(OSError):
                if p.name.startswith(_TMP_PREFIX) and now - p.stat().st_mtime > _SWEEP_AGE_S:
                    log.info("removing leftover %s", p)
                    shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ locks and the LRU
    def lock_for(self, sid: str) -> threading.Lock:
        with self._reg:
            return self._locks.setdefault(sid, threading.Lock())

    @contextlib.contextmanager
    def use(self, sid: str) -> Iterator[Session]:
        """Hold the session's lock and yield it open (opening it, and evicting idle ones, when needed)."""
        check_session_id(sid)
        try:
            with self.lock_for(sid):
                yield self._get_or_open(sid)
        finally:
            if len(self._open) > self.cfg.max_open:  # sessions that were busy when the LRU last overflowed
                self._trim()

    def is_open(self, sid: str) -> bool:
        with self._reg:
            return sid in self._open

    def open_ids(self) -> list[str]:
        with self._reg:
            return list(self._open)

    def _get_or_open(self, sid: str) -> Session:
        with self._reg:
            s = self._open.get(sid)
            if s is not None:
                self._open.move_to_end(sid)
                return s
        s = self._load(sid)  # slow (store, GistNet, LensNet); the session lock keeps it single
        with self._reg:
            self._open[sid] = s
            self.counters["opens"] += 1
        self._trim(keep=sid)
        return s

    def _trim(self, keep: str | None = None) -> None:
        """Close (save) least recently used idle sessions until at most ``max_open`` stay open."""
        victims = []
        with self._reg:
            for vid in list(self._open):  # least recently used first
                if len(self._open) <= self.cfg.max_open:
                    break
                lock = self._locks[vid]
                if vid != keep and lock.acquire(blocking=False):  # busy sessions are skipped, not waited for
                    victims.append((self._open.pop(vid), lock))
                    self.counters["evictions"] += 1
        for v, lock in victims:
            try:
                log.info("evicting session %s (LRU of %d)", v.sid, self.cfg.max_open)
                self._close(v)
            finally:
                lock.release()

    # ------------------------------------------------------------------ open / create / delete
    def session_dir(self, sid: str) -> Path:
        return self.root / check_session_id(sid)

    def exists(self, sid: str) -> bool:
        return (self.session_dir(sid) / STORE / ENGINE_FILE).is_file()

    def _model_names(self, sid: str, meta: dict) -> dict:
        """The allowed names of the models a store records; refuses a store using anything else."""
        names = {}
        for kind, path in (("base", meta["base"]["path"]), ("gistnet", meta.get("gistnet")),
                           ("lensnet", meta.get("lensnet"))):
            entry = self.catalog.by_path(path)
            if path is not None and (entry is None or entry.kind != kind):
                raise ServeError(409, f"session {sid!r} uses a {kind} this server does not allow "
                                      f"({Path(path).name!r}); restart the server with it in --models")
            names[kind] = entry.name if entry else None
        return names

    def _read_meta(self, sid: str) -> dict:
        store = self.session_dir(sid) / STORE
        if not (store / ENGINE_FILE).is_file():
            raise not_found(f"session {sid!r} does not exist")
        try:
            return read_engine_meta(store)
        except StoreError as e:
            log.error("session %s: %s", sid, e)
            raise ServeError(409, f"session {sid!r} has a damaged store (details in the server log)") from e

    def _load(self, sid: str) -> Session:
        path = self.session_dir(sid)
        meta = self._read_meta(sid)
        names = self._model_names(sid, meta)
        fb = self.catalog.base(names["base"])
        try:
            # autoflush off: a request is made durable once, by commit(), however many calls it made
            mc = MegaContext.open(path / STORE, fb, durable=self.cfg.durable, autoflush=False)
        except StoreBusyError as e:
            raise ServeError(423, f"session {sid!r} is open in another process (its store lock is held); "
                                  "one server per session") from e
        except (StoreError, ValueError) as e:
            log.error("session %s: cannot open: %s", sid, e)
            raise ServeError(409, f"session {sid!r} cannot be opened (details in the server log)") from e
        state = _read_state(path / STATE)
        s = Session(sid, path, mc, state, names, capacity(mc.engine.cfg, self.cfg.max_session_tokens))
        s._saved_state = json.dumps(state, sort_keys=True)
        return s

    def create(self, sid: str, base: str, gistnet: str | None, lensnet: str | None,
               config: EngineConfig) -> Session:
        """A new session (409 if it exists); the store is built under a temporary name and renamed into place."""
        with self.lock_for(check_session_id(sid)):
            if self.session_dir(sid).exists():
                raise ServeError(409, f"session {sid!r} already exists")
            if self.count() >= self.cfg.max_sessions:
                raise ServeError(409, f"this server already holds its maximum of {self.cfg.max_sessions} sessions")
            fb = self.catalog.base(base)
            if config.focus == "auto" and lensnet is None:  # resolved within this server's allow-list
                entry = self.catalog.for_base("lensnet", fb.fingerprint)
                lensnet = entry.name if entry is not None else None
                config = config.replace(focus="lensnet" if entry is not None else "lexical")
            tmp = self.root / f"{_TMP_PREFIX[0]}{sid}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                paths = {k: None if v is None else str(self.catalog.get(k, v).path)
                         for k, v in (("gistnet", gistnet), ("lensnet", lensnet))}
                try:
                    MegaContext.create(tmp / STORE, fb, config=config, durable=self.cfg.durable, **paths).close()
                except ValueError as e:  # a checkpoint or config the API refuses (paths are the allow-list's)
                    raise bad_request(f"session {sid!r} cannot be created: {e}") from e
                _write_state(tmp / STATE, {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                             self.cfg.durable)
                try:
                    os.rename(tmp, self.session_dir(sid))
                except OSError as e:  # another process created it meanwhile
                    raise ServeError(409, f"session {sid!r} already exists") from e
                if self.cfg.durable:
                    fsync_dir(self.root)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            log.info("created session %s (base %s, gistnet %s, lensnet %s)", sid, base, gistnet, lensnet)
            return self._get_or_open(sid)

    def delete(self, sid: str) -> None:
        """Close the session and remove its directory (423 while another process holds its store)."""
        with self.lock_for(check_session_id(sid)):
            with self._reg:
                s = self._open.pop(sid, None)
            if s is not None:
                self._close(s)
            path = self.session_dir(sid)
            if not path.exists():
                raise not_found(f"session {sid!r} does not exist")
            fd = _try_lock(path / STORE / STORE_LOCK)
            if fd is None:
                raise ServeError(423, f"session {sid!r} is open in another process; not deleted")
            try:
                trash = self.root / f"{_TMP_PREFIX[1]}{sid}-{uuid.uuid4().hex[:8]}"
                os.rename(path, trash)
                if self.cfg.durable:
                    fsync_dir(self.root)
            finally:
                os.close(fd)
            shutil.rmtree(trash, ignore_errors=True)
            log.info("deleted session %s", sid)

    # ------------------------------------------------------------------ listing
    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if SESSION_ID.fullmatch(p.name) and (p / STORE / ENGINE_FILE).is_file())

    def count(self) -> int:
        return len(self.ids())

    def info(self, sid: str) -> dict:
        """Info without opening the engine (an idle session is read from its committed engine.json)."""
        check_session_id(sid)
        with self._reg:
            s = self._open.get(sid)
        if s is not None:
            return s.info()
        meta = self._read_meta(sid)
        cfg = EngineConfig.from_dict(meta["config"])
        state = _read_state(self.session_dir(sid) / STATE)
        return {"id": sid, "open": False, "num_tokens": int(meta.get("num_tokens", 0)),
                "capacity": capacity(cfg, self.cfg.max_session_tokens), **self._model_names(sid, meta),
                "config": cfg.to_dict(), "created": state.get("created")}

    # ------------------------------------------------------------------ durability
    def commit(self, s: Session) -> None:
        """Make everything done on ``s`` durable before it is acknowledged: the one commit point."""
        t0 = time.perf_counter()
        s.mc.flush()
        text = json.dumps(s.state, sort_keys=True)
        if text != s._saved_state:
            _write_state(s.path / STATE, s.state, self.cfg.durable)
            s._saved_state = text
        with self._reg:
            self.counters["commits"] += 1
            self._commit_ms.append((time.perf_counter() - t0) * 1e3)

    def stats(self) -> dict:
        """Counters since start-up and the latency of the latest commits (milliseconds)."""
        with self._reg:
            ms = sorted(self._commit_ms)
            out = {"open_sessions": len(self._open), "max_open": self.cfg.max_open, **self.counters}
        if ms:
            q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
            out["commit_ms"] = {"n": len(ms), "mean": round(statistics.fmean(ms), 3), "p50": round(q[49], 3),
                                "p99": round(q[98], 3)}
        return out

    def _close(self, s: Session) -> None:
        try:
            s.mc.close()
        except Exception:  # keep going: the lock must not stay held by a session nobody can reach any more
            log.exception("session %s: close failed; releasing its store", s.sid)
            with contextlib.suppress(Exception):
                s.mc.tree.close()

    def close_all(self) -> None:
        for sid in self.open_ids():
            with self.lock_for(sid):
                with self._reg:
                    s = self._open.pop(sid, None)
                if s is not None:
                    self._close(s)


def _read_state(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s unreadable (%s); starting from an empty server state", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, state: dict, durable: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(state, fh, sort_keys=True)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def _try_lock(path: Path) -> int | None:
    """Take the store's flock without blocking; None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
