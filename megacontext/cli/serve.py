"""``megacontext serve`` and ``megacontext mcp``: argument parsing and start-up (``register(subparsers)``).

Configuration errors (a bad flag value, no token, a model directory that is not allowed) are raised as
ConfigError/ValueError before anything binds a port, so the CLI reports them on one line with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from megacontext.core.config import ConfigError, add_config_args, config_from_args
from megacontext.serve.config import ServeConfig
from megacontext.serve.protocol import TOKEN_ENV

log = logging.getLogger(__name__)

SERVE_HELP = f"""\
Serve MegaContext memories over HTTP: one session = one persistent memory (a store directory under
DATA_ROOT/sessions/<id>), shared base model, sessions kept open in a bounded LRU.

Endpoints (all under /v1 need 'Authorization: Bearer <token>'; the token comes from ${TOKEN_ENV} or
--token-file; --insecure-local serves without one, on a loopback address only):
  GET  /healthz                              liveness (no token)
  GET  /v1/models                            the allowed models (--models)
  GET  /v1/stats                             opens, evictions, commits and their latency, memory
  GET  /v1/sessions, POST /v1/sessions       list / create {{id, base, gistnet, lensnet, config}}
  GET|DELETE /v1/sessions/ID                 info / delete
  POST /v1/sessions/ID/append                {{text}}
  POST /v1/sessions/ID/generate              {{prompt, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                              stream}}; stream=true answers with server-sent events
  POST /v1/sessions/ID/score                 {{text, per_token}}
  GET  /v1/sessions/ID/text?tokens=N         the latest N tokens as text
  GET  /v1/sessions/ID/focus-map?format=html|ascii, GET /v1/sessions/ID/telemetry
  POST /v1/completions, /v1/chat/completions OpenAI-style; the session is the X-MegaContext-Session header,
                                             else the 'user' field
Durability: every request that changes a memory is committed to disk before it is answered (a SIGKILL
loses nothing acknowledged). Details: docs/serve.md."""

MCP_HELP = f"""\
Serve the memory operations as Model Context Protocol tools over stdio (list_sessions, create_session,
session_info, append, generate, score, read, focus_map, telemetry). In-process by default (sessions under
--data-root, the same flags as 'megacontext serve'; --host/--port/--token-file/--insecure-local/--workers/
--max-body-bytes do not apply); with --url every call goes to a running 'megacontext serve' (token from
${TOKEN_ENV})."""


def _flags(args: argparse.Namespace) -> argparse.Namespace:
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if "." in k or k in names})


def _bare_switch(parser: argparse.ArgumentParser, flag: str) -> None:
    """Let a generated boolean flag also be given bare (``--insecure-local`` = ``--insecure-local true``)."""
    action = parser._option_string_actions[flag]  # argparse keeps no public handle on added actions
    action.nargs, action.const = "?", True


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file with ServeConfig fields (flags override it)")
    add_config_args(p, ServeConfig)
    for flag in ("--insecure-local", "--auto-create"):
        _bare_switch(p, flag)


def _service(cfg: ServeConfig):
    from megacontext.serve.service import MemoryService

    return MemoryService(cfg)  # loads the default base model


def _require_extra(*modules: str) -> None:
    """One clear line (exit 2) instead of an ImportError traceback when the serve extra is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: this command needs the serve extra "
                          "(pip install -e '.[serve]')")


def cmd_serve(args) -> int:
    from megacontext.serve.config import read_token

    cfg = config_from_args(ServeConfig, _flags(args), args.config)
    token = read_token(cfg)  # before loading anything: a server without a token must not start
    _require_extra("fastapi", "uvicorn")
    import uvicorn

    from megacontext.serve.app import create_app

    service = _service(cfg)
    app = create_app(service, token)
    auth = "bearer token required" if token else "NO AUTHENTICATION (--insecure-local)"
    log.info("megacontext serve on http://%s:%d (data root %s; %d sessions; %s)", cfg.host, cfg.port,
             cfg.data_root, service.sessions.count(), auth)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=30)
    return 0


def cmd_mcp(args) -> int:
    cfg = config_from_args(ServeConfig, _flags(args), args.config)
    _require_extra("mcp", "httpx")
    from megacontext.serve.mcp_server import LocalBackend, build_server

    if args.url:
        from megacontext.serve.client import MegaContextClient

        backend = MegaContextClient(args.url)
    else:
        backend = LocalBackend(_service(cfg))
    try:
        build_server(backend).run("stdio")
    finally:
        backend.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve memories over HTTP (sessions, SSE streaming, OpenAI-style endpoints)",
                       description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mcp", help="serve memories as MCP tools over stdio", description=MCP_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running 'megacontext serve' to forward to (default: in-process)")
    _add_serve_args(p)
    p.set_defaults(func=cmd_mcp)
