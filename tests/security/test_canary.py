"""Canary secrets (the admin key, an issued key, a wrong key, an upstream key) never show up where they must not:
the server's log at debug level, the database files, any response (``/metrics`` included), ``locopilot config``.
A canary prompt and reply show up only where ``LOCOPILOT_LOG_PROMPTS`` puts them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from tests.conftest import SMOL, Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import ADMIN, ADMIN_KEY, assert_unauthorized, keyed_server

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


PROMPT_CANARY = "canary-prompt-3e8d1c6b2a90f7e4"
COMPLETION_CANARY = "canary-completion-b5a49c2e71d0"


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_and_completions_are_stored_only_with_log_prompts(
    tmp_path: Path, smollm2_path: Path, log_prompts: bool
) -> None:
    """Off: a prompt and a reply (and an upstream error quoting the prompt) are nowhere but in the reply
    itself. On: they are in the request log's rows, and still never in the log lines or the metrics."""
    upstream = FaultUpstream()
    upstream.WORDS = ("Sure", f" {COMPLETION_CANARY}", ".")  # type: ignore[misc]
    upstream.start()
    env = {
        "LOCOPILOT_ADMIN_KEY": ADMIN_KEY,
        "LOCOPILOT_LOG_LEVEL": "debug",
        "LOCOPILOT_REMOTE_URL": upstream.url,
        "LOCOPILOT_LOG_PROMPTS": str(log_prompts).lower(),
    }
    server = Server(tmp_path / "server", {SMOL: smollm2_path}, env).start(path="/health")
    headers = {**ADMIN, "X-Routing-Privacy": "any"}
    said = f"Repeat after me: {PROMPT_CANARY}"
    chat = {"model": "remote:fault-small", "messages": [{"role": "user", "content": said}]}
    replies: list[httpx.Response] = []
    others: list[httpx.Response] = []
    try:

        def post(path: str, body: dict[str, Any]) -> httpx.Response:
            return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)

        for stream in (False, True):
            replies.append(post("/v1/chat/completions", chat | {"stream": stream}))
        replies.append(post("/v1/completions", {"model": "remote:fault-small", "prompt": said}))
        replies.append(post("/v1/chat/completions", chat | {"model": SMOL, "max_tokens": 2}))
        for reply in replies:
            assert reply.status_code == 200, reply.text
        others.append(post("/v1/embeddings", {"model": "remote:fault-small", "input": said}))
        assert others[-1].status_code == 200, others[-1].text
        upstream.mode = "echo_400"
        quoted = post("/v1/chat/completions", chat)  # the requester's own error may quote its request
        assert quoted.status_code == 502 and PROMPT_CANARY in quoted.text
        upstream.mode = "ok"
        for path in ("/v1/engine/stats", "/v1/engine/health", "/v1/admin/audit", "/metrics", "/v1/models"):
            others.append(httpx.get(f"{server.url}{path}", headers=ADMIN, timeout=30))
        assert 'provider="remote"' in others[-2].text  # the metrics counted this traffic
    finally:
        server.stop()
        upstream.stop()
    assert any(PROMPT_CANARY in str(r.body) for r in upstream.requests)  # the prompt did travel
    for reply in replies[:3]:
        assert COMPLETION_CANARY in reply.text  # the reply did carry its canary
    log = server.log_path.read_text(errors="replace")
    assert ("LOCOPILOT_LOG_PROMPTS is on" in log) is log_prompts
    stored = b"".join(path.read_bytes() for path in server.data_dir.glob("locopilot.db*"))
    for canary in (PROMPT_CANARY, COMPLETION_CANARY):
        assert canary not in log, canary
        for response in [*replies, *others]:
            if canary != COMPLETION_CANARY or response not in replies:
                assert canary not in response.text + str(response.headers), (canary, response.url)
        assert (canary.encode() in stored) is log_prompts, canary
    if log_prompts:
        rows = stored_rows(server.db_path)
        assert len(rows) == 6
        assert {json.dumps(row["prompt"]).count(PROMPT_CANARY) for row in rows} == {1}
        by_endpoint = {row["endpoint"]: row for row in rows}
        assert by_endpoint["embeddings"]["completion"] is None
        assert by_endpoint["completions"]["completion"] == f"Sure {COMPLETION_CANARY}."
        # The upstream's error quoted the prompt: the row keeps its code, the prompt is in its own column.
        failed = next(row for row in rows if row["http_status"] == 502)
        assert failed["error"].startswith("upstream_error") and PROMPT_CANARY in json.dumps(failed["prompt"])


def stored_rows(db_path: Path) -> list[dict[str, Any]]:
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        cursor = conn.execute("SELECT endpoint, http_status, error, prompt, completion FROM inference_logs")
        return [
            {"endpoint": e, "http_status": h, "error": err, "prompt": json.loads(p), "completion": c}
            for e, h, err, p, c in cursor
        ]
    finally:
        conn.close()
