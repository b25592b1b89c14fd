"""Canary secrets (the admin key, an issued key, a wrong key, an upstream key) never show up where they must not:
the server's log at debug level, the database files, any response (``/metrics`` included), ``locopilot config``."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from click.testing import CliRunner

from locopilot.cli import cli
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import assert_unauthorized, keyed_server

ADMIN_CANARY = "canary-admin-7c1f0e5a9b3d4e2f"
WRONG_CANARY = "lcp_canary-wrong-5d6e7f8091a2b3c4d5e6f7a8b9c0d1e2f3a4b5c"
UPSTREAM_CANARY = "canary-upstream-0a9b8c7d6e5f"


def test_canaries_stay_out_of_logs_database_and_responses(tmp_path: Path, cloud: FaultUpstream) -> None:
    env = {
        "LOCOPILOT_ADMIN_KEY": ADMIN_CANARY,
        "LOCOPILOT_LOG_LEVEL": "debug",
        "LOCOPILOT_REMOTE_URL": cloud.url,
        "LOCOPILOT_REMOTE_API_KEY": UPSTREAM_CANARY,
    }
    server = keyed_server(tmp_path / "server", env)
    admin = {"Authorization": f"Bearer {ADMIN_CANARY}"}
    bodies: list[str] = []
    try:
        created = httpx.post(f"{server.url}/v1/admin/keys", json={"name": "canary"}, headers=admin, timeout=10)
        issued = created.json()["secret"]
        headers = {"Authorization": f"Bearer {issued}", "X-Routing-Privacy": "any"}
        chat = {"model": "remote:fault-small", "messages": [{"role": "user", "content": "hi"}]}
        for stream in (False, True):
            reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat | {"stream": stream}, headers=headers)
            assert reply.status_code == 200, reply.text
            bodies.append(reply.text + str(reply.headers))
        # The upstream did get its key: the canary is live, not absent by accident.
        assert any(r.headers.get("authorization") == f"Bearer {UPSTREAM_CANARY}" for r in cloud.requests)
        for path in ("/v1/models", "/v1/engine/stats", "/v1/admin/keys", "/openapi/openapi.json", "/metrics"):
            for wrong in ({"Authorization": f"Bearer {WRONG_CANARY}"}, {"x-api-key": WRONG_CANARY}):
                assert_unauthorized(httpx.get(f"{server.url}{path}", headers=wrong, timeout=10), WRONG_CANARY)
        httpx.delete(f"{server.url}/v1/admin/keys/canary", headers=admin, timeout=10)
        assert_unauthorized(httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10), issued)
        paths = ("/v1/admin/keys", "/v1/admin/audit", "/v1/engine/health", "/v1/engine/stats", "/v1/models", "/metrics")
        for path in paths:
            response = httpx.get(f"{server.url}{path}", headers=admin, timeout=10)
            assert response.status_code in (200, 503), path
            bodies.append(response.text + str(response.headers))
        # The metrics did count the traffic the canaries rode on: they are not empty by accident.
        assert 'provider="remote"' in bodies[-1]
    finally:
        server.stop()
    config_env = {k: None for k in os.environ if k.startswith("LOCOPILOT_")} | dict(env)
    config_env |= {"LOCOPILOT_DATA_DIR": str(server.data_dir), "COLUMNS": "400"}
    config = CliRunner().invoke(cli, ["config"], env=config_env, catch_exceptions=False)
    assert config.exit_code == 0
    log = server.log_path.read_text(errors="replace")
    assert "request" in log.lower() or "worker" in log.lower()  # the log is not empty
    stored = b"".join(path.read_bytes() for path in server.data_dir.glob("locopilot.db*"))
    for canary in (ADMIN_CANARY, issued, WRONG_CANARY, UPSTREAM_CANARY):
        assert canary not in log, canary
        assert canary.encode() not in stored, canary
        assert canary not in config.stdout + config.stderr, canary
        for body in bodies:
            assert canary not in body, canary
