"""The HTTP app: FastAPI routes over :class:`MemoryService`, with auth, limits, errors and server-sent events.

Routes (all under ``/v1`` need ``Authorization: Bearer <token>`` unless the server runs ``--insecure-local``):
``GET /healthz``; ``GET /v1/models``; ``GET /v1/stats``; ``GET|POST /v1/sessions``; ``GET|DELETE /v1/sessions/{id}``;
``POST /v1/sessions/{id}/append|generate|score``; ``GET /v1/sessions/{id}/text|telemetry|focus-map``;
``POST /v1/completions`` and ``POST /v1/chat/completions`` (:mod:`megacontext.serve.openai`).

Error contract: every refusal is a 4xx with ``{"error": {"message": <one line>, "type": ..., "code": ...}}``;
a bug is a 500 with a reference to the server log, never a traceback. Bodies larger than ``max_body_bytes`` are
refused by :class:`BodyLimit` before any parsing.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from megacontext.serve import openai
from megacontext.serve.errors import ServeError, one_line
from megacontext.serve.runner import Runner, StreamEnd
from megacontext.serve.service import MemoryService, make_params
from megacontext.serve.sessions import check_session_id
from megacontext.serve.sse import sse, stream_error

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionBody(_Strict):
    id: str | None = None
    base: str | None = None
    gistnet: str | None = "auto"
    lensnet: str | None = "auto"
    config: dict | None = None


class AppendBody(_Strict):
    text: str


class GenerateBody(_Strict):
    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class ScoreBody(_Strict):
    text: str
    per_token: bool = False


# ---------------------------------------------------------------------- middleware and errors
class BodyLimit:
    """Pure ASGI: refuses a body over ``limit`` bytes (by Content-Length, or while reading a chunked one) with a
    413, and replays the buffered body to the app (bodies are small: at most ``limit``)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        chunks, size = [], 0
        first = None
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                first = msg  # a disconnect: hand it on
                break
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await self._refuse(send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        pending = [first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps(ServeError(413, f"request body exceeds this server's limit of {self.limit} bytes")
                          .to_json()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def error_response(e: ServeError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.to_json(), status_code=e.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return error_response(ServeError(400, f"{where}: {first.get('msg', 'invalid request')}{more}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "request refused"
        if e.status_code == 404:
            msg = f"no such endpoint: {request.method} {one_line(request.url.path, 120)}"
        return error_response(ServeError(e.status_code, msg))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        ref = uuid.uuid4().hex[:8]
        log.error("error %s on %s %s", ref, request.method, request.url.path, exc_info=e)
        return error_response(ServeError(500, f"internal error (reference {ref} in the server log)"))


# ---------------------------------------------------------------------- the app
def create_app(service: MemoryService, token: str | None) -> FastAPI:
    """The ASGI app. ``token=None`` disables authentication (``--insecure-local`` only)."""
    cfg = service.cfg
    runner = Runner(cfg.workers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        log.info("shutting down: saving and closing %d open sessions", len(service.sessions.open_ids()))
        runner.shutdown()
        service.close()

    async def authorised(request: Request) -> None:
        if token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ServeError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")

    def session_id(sid: str) -> str:
        return check_session_id(sid)

    app = FastAPI(title="MegaContext", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    auth = [Depends(authorised)]

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        out = service.models()  # OpenAI's list shape holds the base models; checkpoints are listed beside it
        return {"object": "list", "default_base": out["default_base"],
                "data": [{"id": m["name"], "object": "model", "owned_by": "megacontext"}
                         for m in out["models"] if m["kind"] == "base"],
                "checkpoints": [m for m in out["models"] if m["kind"] != "base"]}

    @app.get("/v1/stats", dependencies=auth)
    async def stats():
        return service.stats()

    @app.get("/v1/sessions", dependencies=auth)
    async def list_sessions():
        return await runner.call(None, service.list_sessions)

    @app.post("/v1/sessions", dependencies=auth, status_code=201)
    async def create_session(body: CreateSessionBody):
        sid = check_session_id(body.id) if body.id is not None else None
        return await runner.call(sid, service.create_session, **body.model_dump())

    @app.get("/v1/sessions/{sid}", dependencies=auth)
    async def session_info(sid: str = Depends(session_id)):
        return await runner.call(None, service.session_info, sid)

    @app.delete("/v1/sessions/{sid}", dependencies=auth)
    async def delete_session(sid: str = Depends(session_id)):
        return await runner.call(sid, service.delete_session, sid)

    @app.post("/v1/sessions/{sid}/append", dependencies=auth)
    async def append(body: AppendBody, sid: str = Depends(session_id)):
        return await runner.call(sid, service.append, sid, body.text)

    @app.post("/v1/sessions/{sid}/generate", dependencies=auth)
    async def generate(body: GenerateBody, sid: str = Depends(session_id)):
        params = make_params(**body.model_dump(exclude={"prompt", "stream"}))
        if not body.stream:
            return await runner.call(sid, service.generate, sid, body.prompt, params)
        items = await runner.stream(sid, service.generate, sid=sid, prompt=body.prompt, params=params)

        async def events():
            try:
                async for kind, value in items:
                    if kind == "text":
                        yield sse({"text": value}, "token")
                    elif isinstance(value, StreamEnd):
                        if value.error is not None:
                            yield sse(stream_error(value.error).to_json(), "error")
                        else:
                            yield sse(value.result, "done")
            finally:
                await items.aclose()  # a client that left stops the generation at the next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/sessions/{sid}/score", dependencies=auth)
    async def score(body: ScoreBody, sid: str = Depends(session_id)):
        return await runner.call(sid, service.score, sid, body.text, body.per_token)

    @app.get("/v1/sessions/{sid}/text", dependencies=auth)
    async def read_text(tokens: int = 512, sid: str = Depends(session_id)):
        return await runner.call(sid, service.read_text, sid, tokens)

    @app.get("/v1/sessions/{sid}/telemetry", dependencies=auth)
    async def telemetry(sid: str = Depends(session_id)):
        return await runner.call(None, service.telemetry, sid)

    @app.get("/v1/sessions/{sid}/focus-map", dependencies=auth)
    async def focus_map(format: str = "html", sid: str = Depends(session_id)):
        page = await runner.call(None, service.focus_map, sid, format)
        return HTMLResponse(page) if format == "html" else PlainTextResponse(page)

    app.include_router(openai.router(service, runner), dependencies=auth)
    return app
