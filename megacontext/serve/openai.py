"""OpenAI-style ``/v1/completions`` and ``/v1/chat/completions`` over a session's memory.

Which memory: the ``X-MegaContext-Session`` header, else the request's ``user`` field (both are settable from
the official OpenAI clients: ``default_headers=`` / ``extra_headers=``, or ``user=``). ``model`` is echoed,
never used to pick anything. A missing session is a 404 unless the server runs with ``--auto-create``.

Semantics: the memory is the transcript. ``/v1/completions`` appends the prompt, then the completion.
``/v1/chat/completions`` appends only the messages the memory does not hold yet (the ones after the last
reply this server generated; see :mod:`megacontext.serve.chat`), then the reply; so a client may resend the
whole conversation or send only its new messages. Stop strings are not part of the returned text (the memory
holds them). Supported: ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``stream`` (with ``stream_options.include_usage``). Refused with a 400: ``n`` > 1, ``echo``,
``logprobs``, ``best_of`` > 1, ``suffix``, tools, non-text content, response formats other than text. Other
fields (penalties, ``logit_bias``, ...) are ignored.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from megacontext.serve.chat import ChatMessage
from megacontext.serve.errors import ServeError, bad_request
from megacontext.serve.protocol import SESSION_HEADER
from megacontext.serve.runner import Runner, StreamEnd
from megacontext.serve.service import MemoryService, make_params
from megacontext.serve.sessions import check_session_id
from megacontext.serve.sse import sse, stream_error


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Common(_Lenient):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


class CompletionBody(_Common):
    prompt: str | list[str] = ""
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class MessageBody(_Lenient):
    role: str
    content: str | list[dict] | None = None


class ChatBody(_Common):
    messages: list[MessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None


def _session(request: Request, body: _Common) -> str:
    sid = request.headers.get(SESSION_HEADER) or body.user
    if not sid:
        raise bad_request(f"name the memory session: the {SESSION_HEADER} header or the 'user' field")
    return check_session_id(sid)


def _params(service: MemoryService, body: _Common, max_tokens: int | None):
    if body.n not in (None, 1):
        raise bad_request(f"n={body.n}: one choice per request")
    return make_params(max_new_tokens=max_tokens or min(service.cfg.default_new_tokens, service.cfg.max_new_tokens),
                      temperature=1.0 if body.temperature is None else body.temperature,
                      top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stop)


def _content(m: MessageBody) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise bad_request(f"message content of type {p.get('type')!r}: only text content is supported")
        parts.append(p["text"])
    return "".join(parts)


def _ensure(service: MemoryService, sid: str) -> None:
    """404 for a missing session, or create it with the defaults under ``--auto-create``."""
    if service.sessions.exists(sid):
        return
    if not service.cfg.auto_create:
        raise ServeError(404, f"session {sid!r} does not exist (create it with POST /v1/sessions, or start the "
                              "server with --auto-create)")
    try:
        service.create_session(id=sid)
    except ServeError as e:
        if e.status != 409:  # 409: created meanwhile, which is just as good
            raise


def _complete(service: MemoryService, sid: str, prompt: str, params, **stream) -> dict:
    _ensure(service, sid)
    return service.generate(sid, prompt, params, **stream)


def _chat(service: MemoryService, sid: str, messages: list[ChatMessage], params, **stream) -> dict:
    _ensure(service, sid)
    return service.chat(sid, messages, params, **stream)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(out: dict) -> dict:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["generated_tokens"],
            "total_tokens": out["prompt_tokens"] + out["generated_tokens"]}


def _extra(out: dict) -> dict:
    return {"session": out["id"], "num_tokens": out["num_tokens"], "stop_reason": out["stop_reason"]}


def router(service: MemoryService, runner: Runner) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        sid = _session(request, body)
        if body.echo or body.logprobs is not None or body.best_of not in (None, 1) or body.suffix is not None:
            raise bad_request("echo, logprobs, best_of and suffix are not supported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise bad_request(f"prompt: one prompt per request, got {len(prompts)}")
        params = _params(service, body, body.max_tokens)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or "megacontext"}
        if not body.stream:
            out = await runner.call(sid, _complete, service, sid, prompts[0], params)
            return {**head, "choices": [{"text": out["text"], "index": 0, "logprobs": None,
                                         "finish_reason": _finish(out["stop_reason"])}],
                    "usage": _usage(out), "megacontext": _extra(out)}
        items = await runner.stream(sid, _complete, service=service, sid=sid, prompt=prompts[0], params=params)
        usage = bool((body.stream_options or {}).get("include_usage"))

        def choice(text: str, finish):
            return {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        return _respond(items, lambda t: choice(t, None), lambda out: choice("", _finish(out["stop_reason"])),
                        head, usage)

    @r.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        sid = _session(request, body)
        if body.tools or body.functions:
            raise bad_request("tools / function calling are not supported by this server")
        if body.logprobs:
            raise bad_request("logprobs are not supported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad_request(f"response_format {body.response_format.get('type')!r} is not supported")
        messages = [ChatMessage(m.role, _content(m)) for m in body.messages]
        params = _params(service, body, body.max_completion_tokens or body.max_tokens)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model or "megacontext"}
        if not body.stream:
            out = await runner.call(sid, _chat, service, sid, messages, params)
            return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                         "finish_reason": _finish(out["stop_reason"])}],
                    "usage": _usage(out), "megacontext": _extra(out)}
        items = await runner.stream(sid, _chat, service=service, sid=sid, messages=messages, params=params)
        head = {**head, "object": "chat.completion.chunk"}
        usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish):
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        started = [False]

        def text_chunk(t: str):
            if not started[0]:  # the returned reply is stripped; so is the start of the stream
                t = t.lstrip()
                if not t:
                    return None
                started[0] = True
            return chunk({"content": t}, None)

        first = chunk({"role": "assistant", "content": ""}, None)
        return _respond(items, text_chunk, lambda out: chunk({}, _finish(out["stop_reason"])), head, usage, first)

    return r


def _respond(items, on_text, on_done, head: dict, usage: bool, first: dict | None = None) -> StreamingResponse:
    """OpenAI-style stream: ``data: <chunk>`` lines, an error chunk if the generation failed, ``data: [DONE]``."""

    async def events():
        try:
            if first is not None:
                yield sse(first)
            async for kind, value in items:
                if kind == "text":
                    c = on_text(value)
                    if c is not None:
                        yield sse(c)
                elif isinstance(value, StreamEnd):
                    if value.error is not None:
                        yield sse(stream_error(value.error).to_json())
                    else:
                        yield sse(on_done(value.result))
                        if usage:
                            yield sse({**head, "choices": [], "usage": _usage(value.result)})
            yield sse("[DONE]")
        finally:
            await items.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
