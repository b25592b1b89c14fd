"""Input and network hygiene over a real server: the Host allowlist, CORS, field and body limits,
a nested-JSON bomb and fields that would redirect a request."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from locopilot.gateway.hygiene import MAX_JSON_DEPTH, allowed_hosts, host_name
from locopilot.settings import SettingsError, load_settings
from tests.conftest import Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import ADMIN, keyed_server, upstreams

CHAT = {"model": "lan-model", "messages": [{"role": "user", "content": "hi"}]}
APP_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, cloud: FaultUpstream, lan: FaultUpstream) -> Iterator[Server]:
    """A server with extra Host names, one CORS origin and small body and message limits."""
    env = {
        "LOCOPILOT_UPSTREAMS": upstreams(cloud, lan),
        "LOCOPILOT_ALLOWED_HOSTS": "box.lan, [fd00::5]",
        "LOCOPILOT_CORS_ORIGINS": APP_ORIGIN,
        "LOCOPILOT_MAX_BODY_BYTES": "65536",
        "LOCOPILOT_MAX_MESSAGE_BYTES": "4096",
    }
    running = keyed_server(tmp_path_factory.mktemp("tuned"), env)
    yield running
    running.stop()


def post(server: Server, path: str, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{path}",
        content=content,
        headers={**ADMIN, "Content-Type": "application/json", **headers},
        timeout=60,
    )


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def still_serving(server: Server) -> None:
    assert server.process is not None
    assert server.process.poll() is None
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200


# Host header


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:{port}", "localhost.:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]:{port}"]
)
def test_loopback_host_names_are_served(secured: Server, host: str) -> None:
    response = httpx.get(
        f"{secured.url}/v1/models", headers={**ADMIN, "Host": host.format(port=secured.port)}, timeout=10
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io:{port}", "[::2]", "box.lan"],
)
@pytest.mark.parametrize("path", ["/health", "/v1/models", "/v1/chat/completions"])
def test_foreign_host_names_are_403_before_auth(secured: Server, host: str, path: str) -> None:
    # No key at all: a rebinding page has none, and the answer must not even say whether one is needed.
    headers = {"Host": host.format(port=secured.port)}
    response = httpx.request(
        "POST" if "chat" in path else "GET", f"{secured.url}{path}", json=CHAT, headers=headers, timeout=10
    )
    assert_error(response, 403, "host_not_allowed")
    assert "www-authenticate" not in response.headers


def test_two_host_headers_are_refused(secured: Server) -> None:
    # httpx will not send two; a raw request will.
    raw = b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", secured.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 403), answer


def test_allowed_hosts_adds_names(tuned: Server) -> None:
    for host in ("box.lan", "BOX.LAN:8080", "[fd00::5]:1", "localhost"):
        assert httpx.get(f"{tuned.url}/health", headers={"Host": host}, timeout=10).status_code == 200, host
    assert_error(httpx.get(f"{tuned.url}/health", headers={"Host": "other.lan"}, timeout=10), 403, "host_not_allowed")


def test_which_binds_check_the_host() -> None:
    assert allowed_hosts(load_settings({})) == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_hosts(load_settings({"LOCOPILOT_HOST": "::1"})) == {"localhost", "127.0.0.1", "[::1]"}
    # Exposed without a list: keys guard it; the names clients use are the operator's to give.
    assert allowed_hosts(load_settings({"LOCOPILOT_HOST": "0.0.0.0"})) is None
    exposed = allowed_hosts(load_settings({"LOCOPILOT_HOST": "0.0.0.0", "LOCOPILOT_ALLOWED_HOSTS": "gpu.lan"}))
    assert exposed == {"localhost", "127.0.0.1", "[::1]", "gpu.lan"}
    named = allowed_hosts(load_settings({"LOCOPILOT_HOST": "10.0.0.5", "LOCOPILOT_ALLOWED_HOSTS": "gpu.lan"}))
    assert named is not None
    assert "10.0.0.5" in named


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost:80", "localhost"), ("[::1]:8080", "[::1]"), ("[::1]", "[::1]"), ("Example.COM.", "example.com")],
)
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LOCOPILOT_CORS_ORIGINS", "*"),
        ("LOCOPILOT_CORS_ORIGINS", "https://*.example.com"),
        ("LOCOPILOT_CORS_ORIGINS", "https://app.example.com/path"),
        ("LOCOPILOT_CORS_ORIGINS", "app.example.com"),
        ("LOCOPILOT_ALLOWED_HOSTS", "box.lan:8080"),
        ("LOCOPILOT_ALLOWED_HOSTS", "*"),
    ],
)
def test_bad_lists_stop_startup(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: value})


# CORS


def preflight(server: Server, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return httpx.options(f"{server.url}/v1/chat/completions", headers=headers, timeout=10)


def test_cors_is_off_by_default(secured: Server) -> None:
    response = preflight(secured, "https://evil.example")
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers
    simple = httpx.get(f"{secured.url}/v1/models", headers={**ADMIN, "Origin": "https://evil.example"}, timeout=10)
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers


def test_cors_admits_exact_origins_only(tuned: Server) -> None:
    allowed = preflight(tuned, APP_ORIGIN)
    assert allowed.status_code in (200, 204), allowed.text
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "access-control-allow-credentials" not in allowed.headers
    for origin in ("https://evil.example", "https://app.example.com.evil.example", "http://app.example.com"):
        refused = preflight(tuned, origin)
        assert "access-control-allow-origin" not in refused.headers, origin
        simple = httpx.get(f"{tuned.url}/v1/models", headers={**ADMIN, "Origin": origin}, timeout=10)
        assert "access-control-allow-origin" not in simple.headers, origin
    served = httpx.get(f"{tuned.url}/v1/models", headers={**ADMIN, "Origin": APP_ORIGIN}, timeout=10)
    assert served.headers["access-control-allow-origin"] == APP_ORIGIN


# Field limits


def chat(**fields: Any) -> dict[str, Any]:
    return {**CHAT, **fields}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


REFUSED_FIELDS = {
    "too many messages": (chat(messages=[{"role": "user", "content": "hi"}] * 501), "messages"),
    "no messages": (chat(messages=[]), "messages"),
    "unknown role": (chat(messages=[{"role": "root", "content": "hi"}]), "messages[0].role"),
    "content too long": (chat(messages=[{"role": "user", "content": "x" * (128 * 1024 + 1)}]), "messages[0].content"),
    "multibyte content too long": (chat(messages=[{"role": "user", "content": "é" * (64 * 1024 + 1)}]), None),
    "parts too long": (
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * (128 * 1024 + 1)}]}]),
        "messages[0].content",
    ),
    "temperature high": (chat(temperature=2.01), "temperature"),
    "temperature negative": (chat(temperature=-0.1), "temperature"),
    "top_p high": (chat(top_p=1.5), "top_p"),
    "max_tokens zero": (chat(max_tokens=0), "max_tokens"),
    "max_tokens huge": (chat(max_tokens=65537), "max_tokens"),
    "max_completion_tokens huge": (chat(max_completion_tokens=10**9), "max_completion_tokens"),
    "too many stops": (chat(stop=["a"] * 17), "stop"),
    "long stop": (chat(stop="x" * 513), "stop"),
    "long stop in list": (chat(stop=["x" * 513]), None),
    "logit_bias entries": (chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
    "logit_bias value": (chat(logit_bias={"1": 101}), None),
    "n zero": (chat(n=0), "n"),
    "n huge": (chat(n=10**6), "n"),
    "top_logprobs": (chat(top_logprobs=10**6), "top_logprobs"),
    "schema deep": (chat(response_format=schema_format(nested_schema(28))), "response_format"),
    "schema large": (
        chat(response_format=schema_format({"type": "object", "description": "x" * 70_000})),
        "response_format",
    ),
    "schema huge count": (chat(response_format=schema_format({"type": "string", "minLength": 10**8})), None),
    "long name": (chat(messages=[{"role": "user", "content": "hi", "name": "x" * 257}]), None),
    "long model": (chat(model="m" * 257), "model"),
}


def work_sent(*upstreams: FaultUpstream) -> int:
    """Requests the upstreams got other than the health probe's model-list reads, which come on a timer."""
    return sum(1 for upstream in upstreams for request in upstream.requests if request.method != "GET")


@pytest.mark.parametrize("case", REFUSED_FIELDS)
def test_field_limits(secured: Server, lan: FaultUpstream, case: str) -> None:
    body, param = REFUSED_FIELDS[case]
    before = work_sent(lan)
    assert_error(post(secured, "/v1/chat/completions", body), 400, param=param)
    assert work_sent(lan) == before  # refused before any work


@pytest.mark.parametrize(
    "body",
    [
        chat(messages=[{"role": "user", "content": "hi"}] * 500),
        chat(messages=[{"role": "user", "content": "x" * (128 * 1024)}]),
        chat(temperature=0, top_p=1, max_tokens=65536, stop=["a"] * 16, logit_bias={str(i): -100 for i in range(300)}),
        chat(response_format=schema_format(nested_schema(20))),
        chat(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]),
    ],
    ids=["500 messages", "128 KB message", "limits", "schema depth 20", "developer role"],
)
def test_limits_themselves_are_accepted(secured: Server, body: dict[str, Any]) -> None:
    response = post(secured, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text


def test_completion_and_embedding_texts_are_bounded(secured: Server) -> None:
    long = "x" * (128 * 1024 + 1)
    assert_error(post(secured, "/v1/completions", {"model": "lan-model", "prompt": long}), 400, param="prompt")
    assert_error(post(secured, "/v1/embeddings", {"model": "lan-model", "input": ["hi", long]}), 400, param="input[1]")


def test_message_limit_is_a_setting(tuned: Server) -> None:
    text = "x" * 4097
    assert_error(post(tuned, "/v1/chat/completions", chat(messages=[{"role": "user", "content": text}])), 400)
    assert post(tuned, "/v1/chat/completions", chat(messages=[{"role": "user", "content": text[:-1]}])).is_success


def test_body_over_the_cap_is_413(tuned: Server) -> None:
    body = chat(padding="x" * 70_000)
    assert_error(post(tuned, "/v1/chat/completions", body), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while reading
        data = json.dumps(body).encode()
        for start in range(0, len(data), 8192):
            yield data[start : start + 8192]

    streamed = httpx.post(
        f"{tuned.url}/v1/chat/completions",
        content=chunks(),
        headers={**ADMIN, "Content-Type": "application/json"},
        timeout=60,
    )
    assert_error(streamed, 413)
    still_serving(tuned)


# Nested JSON


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


BOMBS = {
    "arrays in an unknown field": '{"model": "lan-model", "messages": [], "junk": ' + nested(100_000) + "}",
    "objects in an unknown field": ('{"model": "lan-model", "junk": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}"),
    "arrays as the body": nested(100_000),
    "arrays in a schema": (
        '{"model": "lan-model", "messages": [{"role": "user", "content": "hi"}], "response_format": '
        '{"type": "json_schema", "json_schema": {"schema": {"enum": ' + nested(100_000) + "}}}}"
    ),
    "arrays in a tool schema": (
        '{"model": "lan-model", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
        '"function": {"name": "f", "parameters": {"enum": ' + nested(100_000) + "}}}]}"
    ),
    "arrays in a message": '{"model": "lan-model", "messages": [{"role": "user", "content": ' + nested(50_000) + "}]}",
    "just past the limit": (
        '{"model": "lan-model", "messages": [{"role": "user", "content": "hi"}], "junk": '
        + nested(MAX_JSON_DEPTH)
        + "}"
    ),
}


@pytest.mark.parametrize("case", BOMBS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_deeply_nested_json_is_400(secured: Server, case: str, path: str) -> None:
    assert_error(post(secured, path, BOMBS[case].encode()), 400)
    still_serving(secured)


def test_nesting_below_the_limit_is_fine(secured: Server) -> None:
    body = json.dumps(CHAT)[:-1] + ', "junk": ' + nested(MAX_JSON_DEPTH - 2) + "}"
    assert post(secured, "/v1/chat/completions", body.encode()).status_code == 200


# Fields that would redirect a request


REDIRECTS = {
    "api_base": chat(api_base="http://127.0.0.1:1/v1"),
    "base_url": chat(base_url="http://127.0.0.1:1/v1"),
    "api_key": chat(api_key="sk-stolen"),
    "custom_llm_provider": chat(custom_llm_provider="openai"),
    "in a message": chat(messages=[{"role": "user", "content": "hi", "api_base": "http://127.0.0.1:1"}]),
    "in extra_body": chat(extra_body={"base_url": "http://127.0.0.1:1"}),
    "deep in metadata": chat(metadata={"a": [{"b": {"api_base": "http://127.0.0.1:1"}}]}),
}


@pytest.mark.parametrize("case", REDIRECTS)
def test_redirect_fields_are_refused(secured: Server, lan: FaultUpstream, cloud: FaultUpstream, case: str) -> None:
    before = work_sent(lan, cloud)
    response = post(secured, "/v1/chat/completions", REDIRECTS[case])
    assert_error(response, 400, "forbidden_field")
    assert work_sent(lan, cloud) == before


def test_escaped_redirect_field_is_refused(secured: Server) -> None:
    body = json.dumps(CHAT)[:-1] + ', "api\\u005fbase": "http://127.0.0.1:1"}'
    assert_error(post(secured, "/v1/chat/completions", body.encode()), 400, "forbidden_field")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
def test_redirect_fields_are_refused_everywhere(secured: Server, path: str) -> None:
    body = {"model": "lan-model", "prompt": "hi", "input": "hi", "base_url": "http://127.0.0.1:1"}
    assert_error(post(secured, path, body), 400, "forbidden_field")


def test_the_words_alone_are_fine(secured: Server) -> None:
    talk = chat(messages=[{"role": "user", "content": 'What does "api_base" do? And base_url, api_key?'}])
    assert post(secured, "/v1/chat/completions", talk).status_code == 200
    schema = {"type": "object", "properties": {"base_url": {"type": "string"}, "api_key": {"type": "string"}}}
    assert post(secured, "/v1/chat/completions", chat(response_format=schema_format(schema))).status_code == 200
    tool = {"type": "function", "function": {"name": "connect", "parameters": schema}}
    assert post(secured, "/v1/chat/completions", chat(tools=[tool])).status_code == 200


def test_no_source_runs_shells_eval_or_pickle() -> None:
    root = Path(__file__).resolve().parents[2] / "locopilot"
    banned = ("shell=True", "eval(", "exec(", "pickle", "yaml.load(", "os.system(", "os.popen(", "marshal.loads")
    found = [
        f"{path.relative_to(root)}: {word}"
        for path in root.rglob("*.py")
        for word in banned
        if word in path.read_text(encoding="utf-8")
    ]
    assert found == []
