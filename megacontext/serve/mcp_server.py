"""``megacontext mcp``: the memory operations as Model Context Protocol tools (official ``mcp`` SDK, stdio).

Two back ends behind the same tools: in-process (the server owns its sessions under ``--data-root``, exactly
as ``megacontext serve`` would; the stores' locks keep it and a running HTTP server off each other's sessions),
or ``--url`` (every tool call goes to a running ``megacontext serve`` through :class:`MegaContextClient`, with
the token from ``MEGACONTEXT_TOKEN``). Deleting a session is deliberately not a tool: an agent should not be
able to erase its own memory.

A refused call becomes a tool error carrying the server's one-line reason; anything else is reported by the SDK
as a failure of the tool without its text (and logged here, on stderr: stdout carries the protocol).
"""

from __future__ import annotations

import functools
import logging

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from megacontext.serve.client import MegaContextError
from megacontext.serve.errors import ServeError
from megacontext.serve.service import MemoryService, make_params

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "A MegaContext memory: an append-only, unbounded transcript per session, read by a language model through a "
    "fixed-size focused working context. Append every turn you want remembered with `append`; `generate` "
    "continues the memory (the prompt and the output are appended); `read` shows the latest text; `score` "
    "measures how expected a text is under the memory; `focus_map` shows which parts are held in detail."
)


class LocalBackend:
    """A :class:`MemoryService` with the client's keyword interface for generation."""

    def __init__(self, service: MemoryService):
        self.service = service

    def __getattr__(self, name):
        return getattr(self.service, name)

    def generate(self, sid: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> dict:
        params = make_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, stop=stop)
        return self.service.generate(sid, prompt, params)


def _refusals_as_tool_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ServeError, MegaContextError) as e:
            raise ToolError(e.message) from e
        except Exception:
            log.exception("tool %s failed", fn.__name__)
            raise
    return wrapper


def build_server(backend) -> MCPServer:
    """The MCP server; ``backend``: a :class:`LocalBackend` or a :class:`MegaContextClient`."""
    mcp = MCPServer("megacontext", instructions=INSTRUCTIONS)
    tool = lambda fn: mcp.tool()(_refusals_as_tool_errors(fn))

    @tool
    def list_sessions() -> dict:
        """List the memory sessions (id, and whether each is open in memory now)."""
        return backend.list_sessions()

    @tool
    def create_session(session: str | None = None, focus: str | None = None, w_max: int | None = None) -> dict:
        """Create a memory session (id: 1-64 ASCII letters, digits, '_' or '-'; generated when omitted). focus:
        recency | lexical | lensnet (as the server allows); w_max: working-context budget in tokens."""
        config = {k: v for k, v in (("focus", focus), ("wc", {"w_max": w_max} if w_max else None)) if v}
        return backend.create_session(id=session, config=config or None)

    @tool
    def session_info(session: str) -> dict:
        """Size, capacity, models and engine settings of a session."""
        return backend.session_info(session)

    @tool
    def append(session: str, text: str) -> dict:
        """Append text (e.g. a turn 'User: ...\\n') to the session's memory; durable once this returns."""
        return backend.append(session, text)

    @tool
    def generate(session: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None) -> dict:
        """Continue the memory after appending `prompt`; the output is appended too. Stop strings end the output
        and are not part of the returned text."""
        return backend.generate(session, prompt, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop)

    @tool
    def score(session: str, text: str) -> dict:
        """Mean negative log-likelihood (nats/token) and perplexity of `text` under the memory (text is appended)."""
        return backend.score(session, text)

    @tool
    def read(session: str, tokens: int = 512) -> str:
        """The latest `tokens` tokens of the session's memory as text."""
        return backend.read_text(session, tokens)["text"]

    @tool
    def focus_map(session: str, format: str = "ascii") -> str:
        """Where the memory holds detail: 'ascii' (a terminal rendering) or 'html' (a self-contained page)."""
        return backend.focus_map(session, format)

    @tool
    def telemetry(session: str) -> dict:
        """Summary of the session's focus telemetry (refocus steps, expansions, swap rate, latency)."""
        return backend.telemetry(session)

    return mcp
