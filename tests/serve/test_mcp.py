"""``megacontext mcp``'s tools on the in-process back end (the default mode), through the SDK's own client."""

from __future__ import annotations

import json
import os
import sys

import anyio
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("mcp", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="needs the serve extra: pip install -e '.[serve]'")

from megacontext.api import EngineConfig
from megacontext.serve.config import ServeConfig
from megacontext.serve.mcp_server import LocalBackend, build_server
from megacontext.serve.service import MemoryService
from tests.serve.conftest import REPO


def _data(result) -> dict:
    assert not result.is_error, result.content
    return result.structured_content or json.loads(result.content[0].text)


def test_mcp_tools_in_process(tmp_path, tiny_model_path):
    from mcp import Client

    engine = EngineConfig.from_dict({"wc": {"w_max": 160, "recent_raw": 64}})
    cfg = ServeConfig(data_root=str(tmp_path / "data"), models=(str(tiny_model_path),), device="cpu", engine=engine,
                      max_new_tokens=16)
    service = MemoryService(cfg)

    async def main():
        async with Client(build_server(LocalBackend(service))) as cl:
            assert _data(await cl.call_tool("create_session", {"session": "m1", "focus": "lexical"}))["id"] == "m1"
            got = _data(await cl.call_tool("append", {"session": "m1", "text": "The locker code is 4711.\n" * 4}))
            assert got["num_tokens"] == got["appended_tokens"] > 0
            gen = _data(await cl.call_tool("generate", {"session": "m1", "prompt": "Code:", "max_new_tokens": 5}))
            assert gen["generated_tokens"] == 5 and gen["num_tokens"] > got["num_tokens"]
            scored = _data(await cl.call_tool("score", {"session": "m1", "text": "4711"}))
            assert scored["mean_nll"] > 0 and scored["num_tokens"] == gen["num_tokens"] + scored["tokens"]
            text = (await cl.call_tool("read", {"session": "m1", "tokens": 4096})).content[0].text
            assert text.startswith("The locker code is 4711.") and "Code:" + gen["text"] + "4711" in text
            assert "focus map" in (await cl.call_tool("focus_map", {"session": "m1"})).content[0].text
            assert _data(await cl.call_tool("telemetry", {"session": "m1"}))["summary"]["steps"] > 0
            info = _data(await cl.call_tool("session_info", {"session": "m1"}))
            assert info["config"]["focus"] == "lexical" and info["num_tokens"] == scored["num_tokens"]
            bad = await cl.call_tool("generate", {"session": "m1", "max_new_tokens": 17})
            assert bad.is_error and "exceeds this server's limit 16" in bad.content[0].text
            bad = await cl.call_tool("append", {"session": "..", "text": "x"})
            assert bad.is_error and "invalid session id" in bad.content[0].text
            assert "delete_session" not in {t.name for t in (await cl.list_tools()).tools}

    anyio.run(main)
    n = service.session_info("m1")["num_tokens"]
    service.close()  # saved and closed: a fresh service (a restarted server) sees the same memory
    again = MemoryService(cfg)
    assert again.session_info("m1")["num_tokens"] == n and again.read_text("m1", 4)["end"] == n
    again.close()


@pytest.mark.slow
def test_mcp_over_stdio(tmp_path, tiny_model_path):
    """The real ``megacontext mcp`` process, attached over stdio as an agent host would (slow: a process start)."""
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"},
        args=["-m", "megacontext.cli", "mcp", "--data-root", str(tmp_path / "data"), "--models",
              str(tiny_model_path), "--device", "cpu", "--engine.wc.w-max", "160", "--engine.wc.recent-raw", "64"])

    async def main():
        async with Client(params) as cl:
            _data(await cl.call_tool("create_session", {"session": "io"}))
            _data(await cl.call_tool("append", {"session": "io", "text": "hello over stdio\n"}))
            assert "hello over stdio" in (await cl.call_tool("read", {"session": "io"})).content[0].text

    anyio.run(main)
    assert (tmp_path / "data" / "sessions" / "io" / "store").is_dir()
