"""MemoryService: the operations on sessions, as synchronous calls returning JSON-able dicts.

The HTTP app runs them in its thread pool; the MCP server runs them in worker threads. Each operation on a
session runs inside ``SessionRegistry.use`` (the session's lock), and every operation that changes a memory
commits (``SessionRegistry.commit``) before it returns, so whatever a caller was told has happened survives
a kill of the process. A failed operation commits whatever it already appended (the memory is a transcript:
tokens already generated stay in it) and re-raises.

Generation streams through ``on_text`` (text pieces, stop strings already removed) and can be stopped
between two tokens with ``cancel`` (a ``threading.Event``: the client went away); ``on_start`` is called once
the request was accepted, before any token, so the HTTP layer can still answer a refusal with a 4xx.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megacontext.api import TELEMETRY_FILE, EngineConfig
from megacontext.core.config import Config, ConfigError, check
from megacontext.runtime.telemetry import read_jsonl, summarise
from megacontext.serve.chat import ChatFormat, ChatMessage, record_reply, text_to_append
from megacontext.serve.config import ServeConfig
from megacontext.serve.errors import ServeError, bad_request
from megacontext.serve.models import ModelCatalog
from megacontext.serve.sessions import STORE, Session, SessionRegistry, check_session_id
from megacontext.serve.stops import StopFilter

log = logging.getLogger(__name__)

# what a client may set in a new session's engine config (the rest comes from the server's --engine.* flags)
CLIENT_CONFIG = {"focus": str, "k": int, "query_rounds": int,
                 "wc": {"w_max": int, "recent_raw": int, "position_mode": str, "recency": str}}
MAX_K, MAX_QUERY_ROUNDS, MAX_STOPS, MAX_STOP_CHARS, MAX_READ_TOKENS = 4096, 16, 8, 64, 65_536


@dataclass
class GenParams(Config):
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1")
        check(0 <= self.temperature <= 100, f"temperature={self.temperature} must lie in [0, 100] (0 = greedy)")
        check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)")
        check(0 < self.top_p <= 1, f"top_p={self.top_p} must lie in (0, 1]")
        self.stop = tuple(self.stop)
        check(len(self.stop) <= MAX_STOPS and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                  for s in self.stop),
              f"stop: at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")


OnText = Callable[[str], None] | None


def make_params(**kw) -> GenParams:
    """GenParams from request fields (``stop`` may be one string, a list or None); invalid values -> 400."""
    stop = kw.pop("stop", None)
    try:
        return GenParams(stop=tuple([stop] if isinstance(stop, str) else (stop or ())), **kw)
    except ConfigError as e:
        raise bad_request(str(e)) from e


class MemoryService:
    def __init__(self, cfg: ServeConfig, catalog: ModelCatalog | None = None):
        self.cfg = cfg
        self.catalog = catalog or ModelCatalog(cfg.models, cfg.base, cfg.device, cfg.dtype)
        self.catalog.base()  # load the default base model now: errors at start-up, no slow first request
        self.sessions = SessionRegistry(cfg, self.catalog)
        self._formats: dict[str, ChatFormat] = {}
        self._viz = threading.Lock()  # matplotlib's pyplot state is global: one focus map at a time

    def close(self) -> None:
        self.sessions.close_all()

    # ------------------------------------------------------------------ sessions
    def models(self) -> dict:
        return {"models": self.catalog.listing(), "default_base": self.catalog.default_base}

    def stats(self) -> dict:
        """Registry counters, commit latency and this process's memory (resident and peak, MiB)."""
        return {**self.sessions.stats(), **_memory_mib()}

    def list_sessions(self) -> dict:
        open_ids = set(self.sessions.open_ids())
        return {"sessions": [{"id": sid, "open": sid in open_ids} for sid in self.sessions.ids()],
                "max_open": self.cfg.max_open}

    def session_info(self, sid: str) -> dict:
        return self.sessions.info(sid)

    def create_session(self, id: str | None = None, base: str | None = None, gistnet: str | None = "auto",
                       lensnet: str | None = "auto", config: dict | None = None) -> dict:
        sid = check_session_id(id) if id is not None else uuid.uuid4().hex[:16]
        base = base or self.catalog.default_base
        fp = self.catalog.base(base).fingerprint
        ecfg = self._engine_config(config)
        gist = self._checkpoint("gistnet", gistnet, fp, base)
        lens = self._checkpoint("lensnet", lensnet, fp, base) if ecfg.focus == "lensnet" else None
        if ecfg.focus == "lensnet" and lens is None:
            raise bad_request(f"focus 'lensnet' needs a LensNet trained for base model {base!r}; none is allowed")
        if ecfg.focus != "lensnet" and lensnet not in (None, "auto", "none"):
            raise bad_request(f"lensnet={lensnet!r} is only used with focus 'lensnet' (focus is {ecfg.focus!r})")
        s = self.sessions.create(sid, base, gist, lens, ecfg)
        return s.info()

    def delete_session(self, sid: str) -> dict:
        self.sessions.delete(sid)
        return {"id": sid, "deleted": True}

    def _checkpoint(self, kind: str, name: str | None, fingerprint: str, base: str) -> str | None:
        if name in (None, "none"):
            return None
        if name == "auto":
            entry = self.catalog.for_base(kind, fingerprint)
            return entry.name if entry else None
        entry = self.catalog.get(kind, name)
        if entry.base_fingerprint != fingerprint:
            raise bad_request(f"{kind} {name!r} was trained for another base model than {base!r}")
        return entry.name

    def _engine_config(self, config: dict | None) -> EngineConfig:
        merged = self.cfg.engine.to_dict()
        for key, value in (config or {}).items():
            want = CLIENT_CONFIG.get(key)
            if want is None:
                raise bad_request(f"config key {key!r} cannot be set by a client; allowed: {sorted(CLIENT_CONFIG)}")
            if isinstance(want, dict):
                if not isinstance(value, dict):
                    raise bad_request(f"config.{key} must be an object")
                for k, v in value.items():
                    if k not in want:
                        raise bad_request(f"config key {key}.{k!r} cannot be set by a client; allowed: {sorted(want)}")
                    merged[key][k] = _typed(f"{key}.{k}", v, want[k])
            else:
                merged[key] = _typed(key, value, want)
        try:
            ecfg = EngineConfig.from_dict(merged)
        except ConfigError as e:
            raise bad_request(f"config: {e}") from e
        if ecfg.wc.w_max > self.cfg.max_w_max:
            raise bad_request(f"config.wc.w_max={ecfg.wc.w_max} exceeds this server's limit {self.cfg.max_w_max}")
        if ecfg.focus not in self.cfg.focus_policies:
            raise bad_request(f"config.focus={ecfg.focus!r} is not allowed; expected one of {self.cfg.focus_policies}")
        if not 1 <= ecfg.k <= MAX_K or ecfg.query_rounds > MAX_QUERY_ROUNDS:
            raise bad_request(f"config: k must lie in [1, {MAX_K}] and query_rounds in [0, {MAX_QUERY_ROUNDS}]")
        return ecfg

    # ------------------------------------------------------------------ memory operations
    def append(self, sid: str, text: str) -> dict:
        """Append text to the session's memory (no model reads beyond the focus policy)."""
        with self.sessions.use(sid) as s, self._committing(s):
            ids = s.mc.base.encode(_text("text", text))
            self._check_room(s, len(ids))
            s.mc.ingest(ids)
            _clear_pending(s)
            return {"id": sid, "appended_tokens": len(ids), "num_tokens": s.mc.num_tokens}

    def generate(self, sid: str, prompt: str = "", params: GenParams | None = None, on_text: OnText = None,
                 on_start: OnText = None, cancel: threading.Event | None = None) -> dict:
        """Append ``prompt``, then generate (the output is appended too). ``stop`` strings end the text and are
        left out of it (the memory holds them)."""
        params = params or GenParams()
        with self.sessions.use(sid) as s, self._committing(s):
            out = self._generate(s, _text("prompt", prompt, allow_empty=True), params, params.stop, on_text,
                                 on_start, cancel)
            out.pop("pending")
            _clear_pending(s)
            return {"id": sid, **out}

    def chat(self, sid: str, messages: list[ChatMessage], params: GenParams | None = None, on_text: OnText = None,
             on_start: OnText = None, cancel: threading.Event | None = None) -> dict:
        """Append the messages the memory does not hold yet (see :mod:`megacontext.serve.chat`), then the reply."""
        params = params or GenParams()
        if not messages:
            raise bad_request("messages must not be empty")
        with self.sessions.use(sid) as s, self._committing(s):
            fmt = self._format(s)
            state = s.state.setdefault("chat", {})
            prompt = text_to_append(fmt, messages, state, self._ends_line(s))
            out = self._generate(s, prompt, params, params.stop + fmt.stops, on_text, on_start, cancel)
            out["text"] = out["text"].strip()
            record_reply(state, out["text"], out.pop("pending"))
            out["format"] = fmt.name
            return {"id": sid, **out}

    def score(self, sid: str, text: str, per_token: bool = False) -> dict:
        """Per-token NLL of ``text`` under the memory (the text is appended)."""
        with self.sessions.use(sid) as s, self._committing(s):
            ids = s.mc.base.encode(_text("text", text))
            self._check_room(s, len(ids))
            res = s.mc.score(ids)
            _clear_pending(s)
            mean = res.mean_nll
            out = {"id": sid, "tokens": len(ids), "mean_nll": _finite(mean),
                   "perplexity": _finite(math.exp(mean)) if math.isfinite(mean) else None,
                   "num_tokens": s.mc.num_tokens}
            if per_token:
                out["nll"] = [_finite(v) for v in res.nll.tolist()]
            return out

    def read_text(self, sid: str, tokens: int = 512) -> dict:
        """The last ``tokens`` tokens of the memory as text (the transcript tail)."""
        if not 1 <= tokens <= MAX_READ_TOKENS:
            raise bad_request(f"tokens={tokens} must lie in [1, {MAX_READ_TOKENS}]")
        with self.sessions.use(sid) as s:
            n = s.mc.num_tokens
            start = max(0, n - tokens)
            text = s.mc.base.decode(s.mc.tree.tokens(start, n).tolist()) if n else ""
            return {"id": sid, "start": start, "end": n, "text": text}

    def telemetry(self, sid: str) -> dict:
        steps = self._steps(sid)
        return {"id": sid, "summary": summarise(steps)}

    def focus_map(self, sid: str, fmt: str = "html") -> str:
        """The focus map as a self-contained HTML page (``fmt="html"``) or an ASCII rendering (``"ascii"``)."""
        if fmt not in ("html", "ascii"):
            raise bad_request(f"format={fmt!r}; expected 'html' or 'ascii'")
        steps = self._steps(sid)
        if not steps:
            raise ServeError(409, f"session {sid!r} has no refocus steps yet (append some text first)")
        from megacontext.runtime.viz import ascii_map, render_html  # matplotlib: only loaded when a map is asked for

        if fmt == "ascii":
            return ascii_map(steps, width=100, height=16)
        with self._viz, tempfile.TemporaryDirectory() as tmp:
            path = render_html(steps, Path(tmp) / "focus_map.html", title=f"MegaContext focus map: session {sid}")
            return path.read_text(encoding="utf-8")

    # ------------------------------------------------------------------ helpers
    def _steps(self, sid: str) -> list[dict]:
        """Telemetry rows of a session, read from its log (no engine needed; the log tolerates a live writer)."""
        if not self.sessions.exists(sid):
            raise ServeError(404, f"session {sid!r} does not exist")
        path = self.sessions.session_dir(sid) / STORE / TELEMETRY_FILE
        if not path.is_file():
            return []
        try:
            return read_jsonl(path)[0]
        except ValueError as e:
            log.error("session %s: telemetry unreadable: %s", sid, e)
            raise ServeError(409, f"session {sid!r} has an unreadable telemetry log (details in the server log)") from e

    @contextlib.contextmanager
    def _committing(self, s: Session):
        try:
            yield
        except BaseException:
            try:  # what was already appended stays; commit it so memory and disk agree
                self.sessions.commit(s)
            except Exception:
                log.exception("session %s: commit after a failed request failed", s.sid)
            raise
        self.sessions.commit(s)

    def _check_room(self, s: Session, n_new: int) -> None:
        if s.mc.num_tokens + n_new > s.capacity:
            raise ServeError(409, f"session {s.sid!r} holds {s.mc.num_tokens} tokens; {n_new} more would pass its "
                                  f"capacity of {s.capacity} tokens")

    def _format(self, s: Session) -> ChatFormat:
        name = s.models["base"]
        if name not in self._formats:
            self._formats[name] = ChatFormat(s.mc.base.tokenizer)
        return self._formats[name]

    def _ends_line(self, s: Session) -> bool:
        n = s.mc.num_tokens
        return n == 0 or s.mc.base.decode(s.mc.tree.tokens(n - 1, n).tolist()).endswith("\n")

    def _generate(self, s: Session, prompt: str, p: GenParams, stops: tuple[str, ...], on_text: OnText,
                  on_start: OnText, cancel: threading.Event | None) -> dict:
        if p.max_new_tokens > self.cfg.max_new_tokens:
            raise bad_request(f"max_new_tokens={p.max_new_tokens} exceeds this server's limit "
                              f"{self.cfg.max_new_tokens}")
        mc = s.mc
        ids = mc.base.encode(prompt) if prompt else []
        self._check_room(s, len(ids) + p.max_new_tokens)
        if not ids and mc.num_tokens == 0:
            raise bad_request(f"session {s.sid!r} is empty: give a prompt to generate from")
        eos = mc.base.tokenizer.eos_token
        filt = StopFilter(stops + ((eos,) if eos else ()))
        if on_start is not None:
            on_start("")
        n0 = mc.num_tokens + len(ids)
        pieces = mc.generate(ids, p.max_new_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                             seed=p.seed, stop=stops, stream=True)
        parts, cancelled = [], False
        try:
            for piece in pieces:
                out = filt.feed(piece)
                if out:
                    parts.append(out)
                    if on_text is not None:
                        on_text(out)
                if filt.stopped_on is not None:
                    break
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
        finally:
            pieces.close()  # type: ignore[union-attr]
        rest = filt.finish() if filt.stopped_on is None else ""
        if rest:
            parts.append(rest)
            if on_text is not None:
                on_text(rest)
        text = "".join(parts)
        n_gen = mc.num_tokens - n0
        generated = mc.base.decode(mc.tree.tokens(n0, mc.num_tokens).tolist()) if n_gen else ""
        pending = generated[len(text):] if generated.startswith(text) else (filt.stopped_on or "")
        if filt.stopped_on is not None:
            reason = "eos" if filt.stopped_on == eos else "stop"
        elif cancelled:
            reason = "cancelled"
        else:
            reason = "length" if n_gen >= p.max_new_tokens else "eos"
        return {"text": text, "stop_reason": reason, "prompt_tokens": len(ids), "generated_tokens": n_gen,
                "num_tokens": mc.num_tokens, "pending": pending}


def _memory_mib() -> dict:
    import resource

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_mib"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
        out["peak_rss_mib"] = max(out["peak_rss_mib"], out["rss_mib"])  # the two are sampled differently
    return out


def _clear_pending(s: Session) -> None:
    """Anything but a chat reply ends the memory with text that is not a reply of ours."""
    chat = s.state.get("chat")
    if chat and chat.get("pending") is not None:
        chat["pending"] = None


def _text(name: str, value, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string")
    if not value and not allow_empty:
        raise bad_request(f"{name} must not be empty")
    return value


def _typed(name: str, value, want: type):
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_request(f"config.{name}={value!r} must be an integer")
    if want is str and not isinstance(value, str):
        raise bad_request(f"config.{name}={value!r} must be a string")
    return value


def _finite(v: float) -> float | None:
    return round(float(v), 6) if math.isfinite(v) else None
