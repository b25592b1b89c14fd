"""X-Request-Id on every response, and one JSON log line per request that carries it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.test_api import wait_for_log_row
from tests.test_catalog import make_gguf

ADMIN_KEY = "sk-access-log-admin-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CANARY = "canary-prompt-8f3a1e"  # in a prompt only: must never reach a log line


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: FaultUpstream) -> Iterator[Server]:
    upstreams = [{"name": "fault", "url": upstream.url, "locality": "local"}]
    env = {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY, "LOCOPILOT_UPSTREAMS": json.dumps(upstreams)}
    running = Server(tmp_path_factory.mktemp("access"), {}, env).start(path="/health")
    yield running
    running.stop()


def log_lines(server: Server) -> list[dict[str, object]]:
    """Every line of the server's output, each parsed as JSON (stderr is not a terminal: JSON is the default)."""
    return [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]


def request_line(server: Server, request_id: str) -> dict[str, object]:
    for _ in range(100):
        found = [line for line in log_lines(server) if line.get("request_id") == request_id]
        if found:
            (line,) = found
            return line
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


def chat(server: Server, **headers: str) -> httpx.Response:
    body = {"model": "fault:fault-small", "messages": [{"role": "user", "content": CANARY}]}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={**AUTH, **headers}, timeout=30)


def test_a_reply_has_a_request_id_shared_by_its_log_row_and_its_log_line(server: Server) -> None:
    response = chat(server)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert response.json()["id"] == request_id
    row = wait_for_log_row(server, request_id)
    line = request_line(server, request_id)
    assert line["event"] == "request"
    assert line["level"] == "info"
    assert line["logger"] == "locopilot.access"
    assert {"ts", "message"} <= set(line)
    assert line["key_id"] == row["key_id"] == "admin"
    assert (line["model"], line["provider"], line["status"], line["outcome"]) == ("fault-small", "fault", 200, "ok")
    assert line["endpoint"] == "chat.completions"
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] > 0
    assert (line["tokens_in"], line["tokens_out"]) == (row["tokens_in"], row["tokens_out"])


def test_a_sane_client_id_is_kept_and_an_odd_one_replaced(server: Server) -> None:
    kept = chat(server, **{"X-Request-Id": "trace-01:abc.DEF_9"})
    assert kept.headers["x-request-id"] == "trace-01:abc.DEF_9"
    wait_for_log_row(server, "trace-01:abc.DEF_9")
    for odd in ("has space", "x" * 129, "semi;colon", 'quote"d'):
        response = chat(server, **{"X-Request-Id": odd})
        assert response.status_code == 200
        assert response.headers["x-request-id"] != odd
        assert response.headers["x-request-id"].startswith("chatcmpl-")


def test_every_response_carries_an_id_and_a_line_errors_and_streams_too(server: Server) -> None:
    cases = [
        httpx.get(f"{server.url}/health", timeout=10),
        httpx.get(f"{server.url}/no/such/route", headers=AUTH, timeout=10),
        httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=10),
        httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers=AUTH, timeout=10),
    ]
    assert [r.status_code for r in cases] == [200, 404, 401, 400]
    for response in cases:
        line = request_line(server, response.headers["x-request-id"])
        assert line["status"] == response.status_code
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="fault:fault-small", messages=[{"role": "user", "content": CANARY}], stream=True
    ) as stream:
        request_id = stream.headers["x-request-id"]
        assert [chunk for chunk in stream.parse()]
    assert request_line(server, request_id)["provider"] == "fault"
    client.close()


def test_every_log_line_is_json_without_prompts_or_secrets(server: Server) -> None:
    chat(server)
    text = server.log_path.read_text()
    lines = log_lines(server)  # raises if any line is not JSON
    assert any(line["logger"] == "_granian" for line in lines)  # granian's own lines too
    assert CANARY not in text
    assert ADMIN_KEY not in text
    assert "sk-wrong" not in text


def test_log_format_text_for_people(tmp_path: Path) -> None:
    server = Server(tmp_path, {}, {"LOCOPILOT_LOG_FORMAT": "text"}).start(path="/health")
    try:
        request_id = httpx.get(f"{server.url}/health", timeout=10).headers["x-request-id"]
        time.sleep(0.2)
        (line,) = [line for line in server.log_path.read_text().splitlines() if request_id in line]
        assert " INFO locopilot.access: GET /health 200 " in line
        assert f"request_id={request_id}" in line
    finally:
        server.stop()


def test_a_runner_s_own_output_reaches_the_log_as_json(tmp_path: Path) -> None:
    # A well-formed GGUF of an architecture llama.cpp does not know: the catalog lists it,
    # llama.cpp refuses it inside the runner and says why on the runner's stderr.
    unknown = make_gguf(tmp_path / "unknown.gguf", arch="no-such-arch")
    server = Server(tmp_path / "server", {"unknown": unknown}).start(path="/health")
    try:
        body = {"model": "unknown", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 503, response.text
        for _ in range(100):
            runner_lines = [line for line in log_lines(server) if line.get("event") == "runner"]
            if runner_lines:
                break
            time.sleep(0.05)
        assert runner_lines, server.log_path.read_text()[-3000:]
        assert all(line["model"] == "unknown" and isinstance(line["pid"], int) for line in runner_lines)
    finally:
        server.stop()
