"""``megacontext serve`` as a real process on a free port, driven over HTTP: auth, ids, limits, streaming,
ordering under concurrency, LRU eviction, SIGKILL + restart, the cross-process lock, OpenAI-style endpoints."""

from __future__ import annotations

import http.client
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="needs the serve extra: pip install -e '.[serve]'")

from tests.serve.conftest import TOKEN, Server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("serve")
    s = Server(root / "data", tiny_model_path, "--max-open", "2", "--max-body-bytes", "65536",
               "--max-new-tokens", "2000")
    yield s
    assert s.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown


def _err(resp) -> str:
    """The one-line reason of a refusal (and check its shape)."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    body = resp.json()
    msg = body["error"]["message"]
    assert body["error"]["code"] == resp.status_code and "\n" not in msg and "Traceback" not in resp.text
    return msg


def _sse(text: str) -> list[tuple[str, object]]:
    out = []
    for block in text.strip().split("\n\n"):
        event = re.search(r"^event: (.*)$", block, re.M)
        data = re.search(r"^data: (.*)$", block, re.M).group(1)
        out.append((event.group(1) if event else "message", data if data == "[DONE]" else json.loads(data)))
    return out


def test_auth_is_required_and_checked(server):
    with server.client(token=None) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/v1/sessions")
        assert r.status_code == 401 and "bearer" in _err(r) and r.headers["www-authenticate"] == "Bearer"
    with server.client(token="wrong-token-0123456789") as c:
        assert c.get("/v1/sessions").status_code == 401
    with server.client(token=None, headers={"Authorization": TOKEN}) as c:  # no scheme
        assert c.get("/v1/sessions").status_code == 401
    with server.client() as c:
        assert c.get("/v1/sessions").status_code == 200


@pytest.mark.parametrize("raw", ["..", "%2e%2e", "..%2f..%2fetc", "%2e%2e%2fx", ".%2e", "a%00b", "%EF%BC%8E%EF%BC%8E",
                                 "%D0%B0bc", "x%0A", "-x"])
def test_path_traversal_ids_are_refused(server, raw):
    """Raw request paths (no client-side normalisation): every id that is not one plain component is a 4xx."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for method, path, body in (("GET", f"/v1/sessions/{raw}", None), ("POST", f"/v1/sessions/{raw}/append",
                                                                        json.dumps({"text": "x"}))):
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                       "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        assert resp.status in (400, 404) and "\n" not in data["error"]["message"], (path, resp.status, data)
    conn.close()


def test_traversal_ids_in_bodies_are_refused_and_nothing_leaves_the_data_root(server, tmp_path):
    before = set(Path(server.log).parent.iterdir())
    with server.client() as c:
        for bad in ["..", "../escape", "/abs", "%2e%2e", "\uff0e\uff0e", "a/../../b", "\u0430bc", "ok\n"]:
            r = c.post("/v1/sessions", json={"id": bad})
            assert r.status_code == 400 and "invalid session id" in _err(r)
            r = c.post("/v1/chat/completions", json={"user": bad, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 400
    assert set(Path(server.log).parent.iterdir()) == before


def test_oversized_bodies_are_refused(server):
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "big"})
        r = c.post("/v1/sessions/big/append", json={"text": "x" * 70_000})
        assert r.status_code == 413 and "65536" in _err(r)
        chunks = (b"x" * 10_000 for _ in range(10))  # chunked: no Content-Length to refuse by
        r = c.post("/v1/sessions/big/append", content=chunks, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.get("/v1/sessions/big").json()["num_tokens"] == 0
        assert c.post("/v1/sessions/big/append", json={"text": "fits"}).status_code == 200


def test_bad_requests_get_a_one_line_reason(server):
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "bad"})
        cases = [
            c.post("/v1/sessions/bad/append", json={}),  # missing field
            c.post("/v1/sessions/bad/append", json={"text": 5}),  # wrong type
            c.post("/v1/sessions/bad/append", json={"text": "x", "extra": 1}),  # unknown field
            c.post("/v1/sessions/bad/append", content=b"{not json", headers={"Content-Type": "application/json"}),
            c.post("/v1/sessions/bad/generate", json={"max_new_tokens": 2001}),  # above --max-new-tokens
            c.post("/v1/sessions/bad/generate", json={"top_p": 0}),
            c.post("/v1/sessions/bad/generate", json={"prompt": ""}),  # empty memory, empty prompt
            c.post("/v1/sessions/missing/append", json={"text": "x"}),
            c.post("/v1/sessions", json={"id": "bad"}),  # exists
            c.post("/v1/sessions", json={"config": {"debug": True}}),
            c.post("/v1/sessions", json={"config": {"wc": {"w_max": 10**6}}}),
            c.post("/v1/sessions", json={"config": {"wc": {"w_max": "big"}}}),
            c.post("/v1/sessions", json={"base": "/etc"}),
            c.post("/v1/sessions", json={"gistnet": "../../x"}),
            c.get("/v1/sessions/bad/focus-map", params={"format": "pdf"}),
            c.get("/v1/sessions/bad/text", params={"tokens": 0}),
            c.put("/v1/sessions/bad"),
            c.get("/v1/nowhere"),
        ]
        statuses = [r.status_code for r in cases]
        assert statuses == [400, 400, 400, 400, 400, 400, 400, 404, 409, 400, 400, 400, 400, 400, 400, 400, 405, 404]
        assert all(_err(r) for r in cases)


def test_generation_streams_as_server_sent_events(server):
    with server.client() as c:
        for sid in ("st-a", "st-b"):  # two memories with the same content
            c.post("/v1/sessions", json={"id": sid})
            c.post(f"/v1/sessions/{sid}/append", json={"text": "The ship sailed north past the harbour.\n"})
        whole = c.post("/v1/sessions/st-a/generate", json={"prompt": "User: hello", "max_new_tokens": 12}).json()
        with c.stream("POST", "/v1/sessions/st-b/generate",
                      json={"prompt": "User: hello", "max_new_tokens": 12, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r.read().decode())
        tokens = [d["text"] for e, d in events if e == "token"]
        kind, done = events[-1]
        assert kind == "done" and len(tokens) >= 1
        assert "".join(tokens) == done["text"] == whole["text"]  # greedy: streamed = not streamed
        assert done["num_tokens"] == whole["num_tokens"] and done["generated_tokens"] == 12
        # a refusal before the stream starts is a plain 4xx, not a 200 stream
        r = c.post("/v1/sessions/missing/generate", json={"prompt": "x", "stream": True})
        assert r.status_code == 404 and _err(r)


def test_a_client_that_disconnects_stops_its_generation(server):
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "gone"})
        n0 = c.post("/v1/sessions/gone/append", json={"text": "hello there\n"}).json()["num_tokens"]
        with c.stream("POST", "/v1/sessions/gone/generate", json={"prompt": "x", "max_new_tokens": 2000,
                                                                  "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))  # one token, then hang up
        after = c.post("/v1/sessions/gone/append", json={"text": "next"}).json()  # waits for the generation to end
        assert after["num_tokens"] - n0 < 1000  # stopped long before its 2,000 tokens, and committed


def test_concurrent_requests_on_one_session_stay_ordered(server):
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "order"})

        def turn(i):
            with server.client() as ci:
                if i % 4 == 3:
                    r = ci.post("/v1/sessions/order/generate", json={"prompt": f"<g{i}>", "max_new_tokens": 3})
                    return i, r.json()["num_tokens"], r.json()["prompt_tokens"] + r.json()["generated_tokens"]
                r = ci.post("/v1/sessions/order/append", json={"text": f"<turn {i} " + "word " * (i % 5) + ">\n"})
                return i, r.json()["num_tokens"], r.json()["appended_tokens"]

        with ThreadPoolExecutor(12) as pool:
            done = sorted(pool.map(turn, range(16)), key=lambda t: t[1])
        total = 0
        for _, n_after, added in done:  # each request saw the memory exactly as the previous one left it
            assert n_after == total + added
            total = n_after
        text = c.get("/v1/sessions/order/text", params={"tokens": 4096}).json()["text"]
        marks = [int(m) for m in re.findall(r"<(?:turn |g)(\d+)", text)]
        assert marks == [i for i, _, _ in done]  # the transcript is in acknowledgement order, turns intact
        for i, _, _ in done:
            if i % 4 != 3:
                assert f"<turn {i} " + "word " * (i % 5) + ">\n" in text


def test_lru_evicts_idle_sessions_and_reopens_them_intact(server):
    with server.client() as c:
        for sid in ("lru-1", "lru-2", "lru-3"):
            assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
            c.post(f"/v1/sessions/{sid}/append", json={"text": f"memory of {sid}: " + "ship " * 40})
        opened = {s["id"] for s in c.get("/v1/sessions").json()["sessions"] if s["open"]}
        assert opened == {"lru-2", "lru-3"}  # --max-open 2: the least recently used one was saved and closed
        info = c.get("/v1/sessions/lru-1").json()
        assert info["open"] is False and info["num_tokens"] > 40  # read from the committed store
        r = c.post("/v1/sessions/lru-1/append", json={"text": " and more"})
        assert r.json()["num_tokens"] > info["num_tokens"]
        assert "memory of lru-1: ship" in c.get("/v1/sessions/lru-1/text").json()["text"]
        opened = {s["id"] for s in c.get("/v1/sessions").json()["sessions"] if s["open"]}
        assert opened == {"lru-3", "lru-1"}
        # different sessions run concurrently (and keep evicting each other) without losing a turn
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: server.client().post(f"/v1/sessions/lru-{i % 3 + 1}/append",
                                                          json={"text": f" x{i}"}).raise_for_status(), range(12)))
        for k in (1, 2, 3):
            text = c.get(f"/v1/sessions/lru-{k}/text").json()["text"]
            assert sorted(int(m) for m in re.findall(r" x(\d+)", text)) == [i for i in range(12) if i % 3 + 1 == k]
        stats = c.get("/v1/stats").json()
        assert stats["evictions"] >= 2 and stats["open_sessions"] <= 2 and stats["commit_ms"]["p50"] > 0
        assert stats["rss_mib"] > 0


def test_score_text_focus_map_and_telemetry(server):
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "sc"})
        # the default focus "auto" resolves within the allow-list: no LensNet is allowed for the tiny base
        assert c.get("/v1/sessions/sc").json()["config"]["focus"] == "lexical"
        r = c.get("/v1/sessions/sc/focus-map")
        assert r.status_code == 409 and "no refocus steps" in _err(r)
        c.post("/v1/sessions/sc/append", json={"text": "The ship sailed north. " * 30})
        s = c.post("/v1/sessions/sc/score", json={"text": "The ship sailed north.", "per_token": True}).json()
        assert s["tokens"] == len(s["nll"]) and s["mean_nll"] > 0 and s["perplexity"] > 1
        assert c.get("/v1/sessions/sc/telemetry").json()["summary"]["steps"] > 0
        page = c.get("/v1/sessions/sc/focus-map")
        assert page.headers["content-type"].startswith("text/html") and "data:image/png;base64" in page.text
        assert "focus map" in c.get("/v1/sessions/sc/focus-map", params={"format": "ascii"}).text


def test_openai_completions_and_chat(server):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "X-MegaContext-Session" in _err(r)
        r = c.post("/v1/completions", json={"user": "nobody", "prompt": "x"})
        assert r.status_code == 404 and "--auto-create" in _err(r)
        assert c.post("/v1/completions", json={"user": "oa", "prompt": "x", "n": 2}).status_code == 400
        c.post("/v1/sessions", json={"id": "oa"})
        r = c.post("/v1/completions", json={"user": "oa", "model": "m", "prompt": "The ship", "max_tokens": 5,
                                            "temperature": 0}).json()
        assert r["object"] == "text_completion" and r["model"] == "m" and r["usage"]["completion_tokens"] == 5
        assert r["choices"][0]["finish_reason"] == "length"
        with c.stream("POST", "/v1/completions", json={"user": "oa", "prompt": "The", "max_tokens": 4, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as s:
            events = _sse(s.read().decode())
        assert events[-1] == ("message", "[DONE]") and events[-2][1]["usage"]["completion_tokens"] == 4
        assert events[-3][1]["choices"][0]["finish_reason"] == "length"

        hdr = {"X-MegaContext-Session": "oa"}
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
        r1 = c.post("/v1/chat/completions", headers=hdr, json={"messages": msgs, "max_tokens": 6,
                                                               "temperature": 0}).json()
        reply = r1["choices"][0]["message"]
        assert r1["object"] == "chat.completion" and reply["role"] == "assistant"
        msgs += [reply, {"role": "user", "content": [{"type": "text", "text": "second question"}]}]
        with c.stream("POST", "/v1/chat/completions", headers=hdr,
                      json={"messages": msgs, "max_tokens": 6, "stream": True, "temperature": 0}) as s:
            events = _sse(s.read().decode())
        assert events[0][1]["choices"][0]["delta"]["role"] == "assistant" and events[-1][1] == "[DONE]"
        text = c.get("/v1/sessions/oa/text", params={"tokens": 4096}).json()["text"]
        # the resent history was not appended again; the new turn was, in the plain role-prefixed format
        assert text.count("System: Be brief.\nUser: hello there\nAssistant:") == 1
        assert text.count("second question\nAssistant:") == 1
        r = c.post("/v1/chat/completions", headers=hdr, json={"messages": msgs, "tools": [{"type": "function"}]})
        assert r.status_code == 400 and "tools" in _err(r)


def test_mcp_tools_over_the_http_client(server):
    """The MCP server with the HTTP client as its back end (``megacontext mcp --url``), in-process."""
    import anyio
    from mcp import Client

    from megacontext.serve.client import MegaContextClient
    from megacontext.serve.mcp_server import build_server

    backend = MegaContextClient(server.url, token=TOKEN)
    mcp = build_server(backend)

    async def main():
        async with Client(mcp) as cl:
            names = {t.name for t in (await cl.list_tools()).tools}
            assert {"append", "generate", "score", "focus_map", "read", "create_session"} <= names
            r = await cl.call_tool("create_session", {"session": "mcp-remote"})
            assert not r.is_error
            await cl.call_tool("append", {"session": "mcp-remote", "text": "remember: 4711\n"})
            r = await cl.call_tool("read", {"session": "mcp-remote"})
            assert "remember: 4711" in r.content[0].text
            r = await cl.call_tool("append", {"session": "../x", "text": "x"})
            assert r.is_error and "invalid session id" in r.content[0].text

    anyio.run(main)
    backend.close()
    with server.client() as c:
        assert "remember: 4711" in c.get("/v1/sessions/mcp-remote/text").json()["text"]


def test_sigkill_restart_and_a_second_process(server, tiny_model_path):
    acked = []
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "dur"}).raise_for_status()
        c.post("/v1/sessions", json={"id": "other"}).raise_for_status()
        for i in range(5):
            acked.append(c.post("/v1/sessions/dur/append", json={"text": f"turn {i}: the code is {i}{i}\n"}).json())
        acked.append(c.post("/v1/sessions/dur/generate", json={"prompt": "User:", "max_new_tokens": 7}).json())
        with c.stream("POST", "/v1/sessions/dur/generate",
                      json={"prompt": "Again:", "max_new_tokens": 5, "stream": True}) as s:
            acked.append(_sse(s.read().decode())[-1][1])
        before = c.get("/v1/sessions/dur/text", params={"tokens": 4096}).json()
    assert before["end"] == acked[-1]["num_tokens"]
    server.kill()  # SIGKILL: no shutdown hook runs, nothing is saved on the way out
    server.start()
    with server.client() as c:
        info = c.get("/v1/sessions/dur").json()
        assert info["num_tokens"] == acked[-1]["num_tokens"]
        after = c.get("/v1/sessions/dur/text", params={"tokens": 4096}).json()
        assert after == before  # every acknowledged turn, token for token
        c.post("/v1/sessions/dur/append", json={"text": "after the crash\n"}).raise_for_status()
    # a second server on the same data root (no token, loopback only): refused per session by the store lock
    second = Server(server.data_root, tiny_model_path, "--insecure-local", token=None)
    try:
        with second.client(token=None) as c2:
            r = c2.post("/v1/sessions/dur/append", json={"text": "intruder"})
            assert r.status_code == 423 and "another process" in _err(r)
            assert c2.delete("/v1/sessions/dur").status_code == 423
            assert c2.post("/v1/sessions/other/append", json={"text": "mine now"}).status_code == 200  # idle in 1st
        with server.client() as c:
            assert c.post("/v1/sessions/other/append", json={"text": "x"}).status_code == 423
            assert "intruder" not in c.get("/v1/sessions/dur/text").json()["text"]
    finally:
        second.stop()
    with server.client() as c:  # the other process let go of it: the first one can take it, and delete it
        assert "mine now" in c.get("/v1/sessions/other/text").json()["text"]
        assert c.delete("/v1/sessions/other").json()["deleted"] is True
        assert c.get("/v1/sessions/other").status_code == 404
        assert "other" not in [s["id"] for s in c.get("/v1/sessions").json()["sessions"]]
        assert not any(p.name.startswith(".") for p in (server.data_root / "sessions").iterdir())


def test_concurrent_sessions_generate_in_parallel_threads(server):
    """Two sessions generating at once both finish correctly (model work runs in the thread pool)."""
    with server.client() as c:
        for sid in ("par-1", "par-2"):
            c.post("/v1/sessions", json={"id": sid})
            c.post(f"/v1/sessions/{sid}/append", json={"text": f"{sid} " * 20})
    results = {}

    def gen(sid):
        with server.client() as ci:
            results[sid] = ci.post(f"/v1/sessions/{sid}/generate", json={"max_new_tokens": 20}).json()

    threads = [threading.Thread(target=gen, args=(sid,)) for sid in ("par-1", "par-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["generated_tokens"] == 20 for r in results.values())
