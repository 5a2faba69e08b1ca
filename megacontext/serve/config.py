"""ServeConfig: everything ``megacontext serve`` and ``megacontext mcp`` can be told, validated up front.

The bearer token is not a field: a token on the command line or in a YAML file ends up in ``ps`` output and
in version control. It comes from the environment (``MEGACONTEXT_TOKEN``) or from ``token_file``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from megacontext.api import EngineConfig  # the engine config, re-exported by the public API
from megacontext.core.config import Config, ConfigError, check
from megacontext.serve.protocol import TOKEN_ENV

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MIN_TOKEN_CHARS = 16
FOCUS_POLICIES = ("auto", "recency", "lexical", "lensnet")  # auto: see EngineConfig.focus


@dataclass
class ServeConfig(Config):
    data_root: str = "serve-data"  # sessions live in DATA_ROOT/sessions/<id> (one store directory each)
    host: str = "127.0.0.1"  # bind address
    port: int = 8765  # TCP port
    token_file: str | None = None  # file holding the bearer token (else the MEGACONTEXT_TOKEN environment variable)
    insecure_local: bool = False  # no bearer token; only allowed with a loopback host (127.0.0.1, ::1, localhost)
    models: tuple[str, ...] = ()  # allowed model directories (base models, GistNet, LensNet); empty = the embedded ones
    base: str = ""  # default base model (a name from --models) for new sessions; empty = the first base model
    engine: EngineConfig = field(default_factory=EngineConfig)  # settings of new sessions (clients may set some)
    focus_policies: tuple[str, ...] = FOCUS_POLICIES  # focus policies a client may choose for a new session
    max_w_max: int = 4096  # largest working-context budget a client may ask for
    max_open: int = 8  # open engines kept in memory (least recently used ones are saved and closed)
    workers: int = 4  # threads running model work (different sessions run concurrently)
    max_body_bytes: int = 1_048_576  # largest request body accepted (bytes)
    max_new_tokens: int = 512  # largest generation a request may ask for
    default_new_tokens: int = 128  # generation length when an OpenAI-style request names none (<= max_new_tokens)
    max_session_tokens: int = 1_000_000  # tokens one session may hold (also capped by what its budget can tile)
    max_sessions: int = 10_000  # sessions the data root may hold
    auto_create: bool = False  # OpenAI-style requests naming a missing session create it with the defaults
    durable: bool = True  # fsync every commit (survives power loss; a killed process loses nothing either way)
    device: str | None = None  # auto | cpu | cuda[:N]
    dtype: str | None = None  # auto | float32 | bfloat16 | float16

    def __post_init__(self):
        check(bool(self.data_root), "data_root must not be empty")
        check(0 <= self.port <= 65535, f"port={self.port}; expected 0..65535")
        check(not self.insecure_local or self.host in LOOPBACK,
              f"insecure_local with host={self.host!r}: a server without a token may only listen on a loopback "
              f"address ({', '.join(LOOPBACK)})")
        check(bool(self.focus_policies) and all(p in FOCUS_POLICIES for p in self.focus_policies),
              f"focus_policies={self.focus_policies}; expected a non-empty subset of {FOCUS_POLICIES}")
        check(self.engine.focus in self.focus_policies,
              f"engine.focus={self.engine.focus!r} is not in focus_policies={self.focus_policies}")
        check(self.engine.wc.w_max <= self.max_w_max,
              f"engine.wc.w_max={self.engine.wc.w_max} exceeds max_w_max={self.max_w_max}")
        for name in ("max_open", "workers", "max_body_bytes", "max_new_tokens", "default_new_tokens",
                     "max_session_tokens", "max_sessions", "max_w_max"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")

    @property
    def sessions_dir(self) -> Path:
        return Path(self.data_root) / "sessions"


def read_token(cfg: ServeConfig, environ=os.environ) -> str | None:
    """The bearer token (``token_file`` wins over the environment); None only with ``insecure_local``."""
    token = None
    if cfg.token_file:
        path = Path(cfg.token_file)
        if not path.is_file():
            raise ConfigError(f"token_file={cfg.token_file!r} does not exist")
        token = path.read_text(encoding="utf-8").strip()
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip()
    if token is None:
        if cfg.insecure_local:
            return None
        raise ConfigError(f"no bearer token: set {TOKEN_ENV} or --token-file (or, for a loopback-only server "
                          "without authentication, pass --insecure-local true)")
    check(len(token) >= MIN_TOKEN_CHARS and token.isprintable() and " " not in token,
          f"the bearer token must be at least {MIN_TOKEN_CHARS} printable characters without spaces "
          f"(got {len(token)} characters)")
    return token
