"""The HTTP app's error contract with a stub service (no model): a bug is a 500 with a reference, no traceback."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="needs the serve extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient

from megacontext.serve.app import create_app
from megacontext.serve.config import ServeConfig
from megacontext.serve.errors import ServeError


class _Sessions:
    def open_ids(self):
        return []


class _StubService:
    cfg = ServeConfig(insecure_local=True)
    sessions = _Sessions()

    def list_sessions(self):
        raise RuntimeError("secret detail /srv/data/sessions")

    def session_info(self, sid):
        raise ServeError(423, "session is busy\nsecond line")

    def close(self):
        pass


def test_a_bug_is_a_500_with_a_reference_and_the_traceback_stays_in_the_log(caplog):
    app = create_app(_StubService(), token="t" * 20)
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.ERROR):
        r = c.get("/v1/sessions", headers={"Authorization": "Bearer " + "t" * 20})
        assert r.status_code == 500
        msg = r.json()["error"]["message"]
        assert msg.startswith("internal error (reference ") and "secret" not in r.text and "Traceback" not in r.text
        ref = msg.split("reference ")[1].split()[0]
        assert any(ref in rec.getMessage() and rec.exc_info for rec in caplog.records)
        r = c.get("/v1/sessions/abc", headers={"Authorization": "Bearer " + "t" * 20})
        assert r.status_code == 423 and r.json()["error"]["message"] == "session is busy second line"
        assert c.get("/v1/sessions/abc").status_code == 401  # auth runs before the route
