"""MegaContextClient: a thin synchronous client for ``megacontext serve`` (httpx).

    from megacontext.serve.client import MegaContextClient

    with MegaContextClient("http://127.0.0.1:8765", token="...") as mc:
        mc.create_session("agent-1")
        mc.append("agent-1", "User: my locker code is 4711\\n")
        print(mc.generate("agent-1", "User: what is my locker code?\\nAssistant:", max_new_tokens=16)["text"])
        for piece in mc.stream("agent-1", "User: and my name?\\nAssistant:", stop=["\\nUser:"]):
            print(piece, end="", flush=True)

Every refusal raises :class:`MegaContextError` with the server's status and one-line reason. The token
defaults to the ``MEGACONTEXT_TOKEN`` environment variable. Method names follow
:class:`megacontext.serve.service.MemoryService` (generation takes its sampling settings as keywords), which
lets the MCP server run over either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx

from megacontext.serve.protocol import SESSION_HEADER, SESSION_ID_RULE, TOKEN_ENV, valid_session_id


class MegaContextError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def _error(resp: httpx.Response) -> MegaContextError:
    try:
        msg = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = resp.text[:300] or resp.reason_phrase
    return MegaContextError(resp.status_code, msg)


def _sid(sid: str) -> str:
    """Refuse a bad id here: a path like ``../x`` would be normalised by the URL layer, not refused."""
    if not valid_session_id(sid):
        raise MegaContextError(400, f"invalid session id {repr(sid)[:80]}: expected {SESSION_ID_RULE}")
    return sid


class GenerationStream:
    """Iterates over the text pieces of a streamed generation; ``result`` holds the final summary afterwards."""

    def __init__(self, cm):
        self._cm = cm
        self.result: dict | None = None

    def __iter__(self) -> Iterator[str]:
        with self._cm as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _error(resp)
            for event, data in _events(resp.iter_lines()):
                if event == "token":
                    yield data["text"]
                elif event == "done":
                    self.result = data
                elif event == "error":
                    raise MegaContextError(data["error"]["code"], data["error"]["message"])
        if self.result is None:
            raise MegaContextError(502, "the stream ended without its final event")


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict | str]]:
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                raw = "\n".join(data)
                yield event, raw if raw == "[DONE]" else json.loads(raw)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        raw = "\n".join(data)
        yield event, raw if raw == "[DONE]" else json.loads(raw)


class MegaContextClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8765", token: str | None = None, timeout: float = 600.0,
                 transport: httpx.BaseTransport | None = None):
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> MegaContextClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw):
        resp = self.http.request(method, path, **kw)
        if resp.status_code >= 400:
            raise _error(resp)
        return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.text

    # ------------------------------------------------------------------ sessions
    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def models(self) -> dict:
        return self._call("GET", "/v1/models")

    def stats(self) -> dict:
        return self._call("GET", "/v1/stats")

    def list_sessions(self) -> dict:
        return self._call("GET", "/v1/sessions")

    def create_session(self, id: str | None = None, base: str | None = None, gistnet: str | None = "auto",
                       lensnet: str | None = "auto", config: dict | None = None) -> dict:
        return self._call("POST", "/v1/sessions", json={"id": id, "base": base, "gistnet": gistnet,
                                                        "lensnet": lensnet, "config": config})

    def session_info(self, sid: str) -> dict:
        return self._call("GET", f"/v1/sessions/{_sid(sid)}")

    def delete_session(self, sid: str) -> dict:
        return self._call("DELETE", f"/v1/sessions/{_sid(sid)}")

    # ------------------------------------------------------------------ memory
    def append(self, sid: str, text: str) -> dict:
        return self._call("POST", f"/v1/sessions/{_sid(sid)}/append", json={"text": text})

    def generate(self, sid: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> dict:
        body = dict(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=stop)
        return self._call("POST", f"/v1/sessions/{_sid(sid)}/generate", json=body)

    def stream(self, sid: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> GenerationStream:
        body = dict(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=stop, stream=True)
        return GenerationStream(self.http.stream("POST", f"/v1/sessions/{_sid(sid)}/generate", json=body))

    def score(self, sid: str, text: str, per_token: bool = False) -> dict:
        return self._call("POST", f"/v1/sessions/{_sid(sid)}/score", json={"text": text, "per_token": per_token})

    def read_text(self, sid: str, tokens: int = 512) -> dict:
        return self._call("GET", f"/v1/sessions/{_sid(sid)}/text", params={"tokens": tokens})

    def telemetry(self, sid: str) -> dict:
        return self._call("GET", f"/v1/sessions/{_sid(sid)}/telemetry")

    def focus_map(self, sid: str, fmt: str = "html") -> str:
        return self._call("GET", f"/v1/sessions/{_sid(sid)}/focus-map", params={"format": fmt})

    def chat(self, sid: str, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.0,
             stop: list[str] | None = None) -> dict:
        """One OpenAI-style chat completion in session ``sid``; returns the whole response."""
        body = {"model": "megacontext", "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "stop": stop}
        return self._call("POST", "/v1/chat/completions", json=body, headers={SESSION_HEADER: _sid(sid)})
