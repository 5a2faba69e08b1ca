"""``megacontext serve`` / ``megacontext mcp``: MegaContext memories as a network service for agents.

Layers, each one module:
- :mod:`~megacontext.serve.config`: ``ServeConfig`` (flags, YAML, validation).
- :mod:`~megacontext.serve.models`: the server's allow-list of model directories and the shared base models.
- :mod:`~megacontext.serve.sessions`: session ids, one store directory per session, the LRU of open engines,
  per-session locks and the single commit point.
- :mod:`~megacontext.serve.stops` / :mod:`~megacontext.serve.chat`: stop strings on streamed text; chat
  transcripts (the tokenizer's chat template, else a plain role-prefixed format).
- :mod:`~megacontext.serve.service`: the operations (create, append, generate, score, ...) as plain
  synchronous calls returning JSON-able dicts; shared by the HTTP app and the MCP server.
- :mod:`~megacontext.serve.app` / :mod:`~megacontext.serve.openai`: the FastAPI app (auth, limits, errors,
  server-sent events) and its OpenAI-style completions endpoints.
- :mod:`~megacontext.serve.mcp_server`: the same operations as MCP tools.
- :mod:`~megacontext.serve.client`: a thin httpx client.
- :mod:`~megacontext.cli.serve`: ``register(subparsers)`` for ``serve`` and ``mcp``.

Only the public API is used: :class:`megacontext.api.MegaContext`, :class:`megacontext.base.FrozenBase`,
the engine config and the telemetry/viz readers. Nothing outside this package imports it.
"""
