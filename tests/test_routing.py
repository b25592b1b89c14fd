"""Routing through a front locopilot to real upstreams on loopback.

The front has no models of its own. Behind it: a second locopilot (``peer``,
local) serving SmolLM2, an Ollama stand-in (``ollama``, local), and a scripted
fault upstream (``flaky``, remote). The official openai client drives the front.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import SMOL, Server, free_port, start_server
from tests.fakes.fault_upstream import FaultUpstream
from tests.fakes.ollama import OllamaStandIn
from tests.test_api import log_rows

QUESTION = [{"role": "user", "content": "Which city is the capital of France?"}]


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path_factory, {SMOL: smollm2_path})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaStandIn]:
    stand_in = OllamaStandIn(models=["llama3.2:1b", "qwen2.5:0.5b"])
    stand_in.start()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def flaky() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


def front_server(tmp_path_factory: pytest.TempPathFactory, upstreams: list[dict[str, object]], **env: str) -> Server:
    settings = {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams), "LOCOPILOT_BREAKER_COOLDOWN": "1", **env}
    return start_server(tmp_path_factory, {}, settings)


@pytest.fixture
def front(
    tmp_path_factory: pytest.TempPathFactory, peer: Server, ollama: OllamaStandIn, flaky: FaultUpstream
) -> Iterator[Server]:
    running = front_server(
        tmp_path_factory,
        [
            {"name": "peer", "url": f"{peer.url}/v1", "locality": "local", "priority": 10},
            {"name": "ollama", "kind": "ollama", "url": ollama.url, "locality": "local", "priority": 20},
            {"name": "flaky", "url": flaky.url, "locality": "remote", "priority": 30, "models": [SMOL, "cloud-1"]},
        ],
    )
    yield running
    running.stop()


def flaky_before_peer(flaky: FaultUpstream, peer: Server) -> list[dict[str, object]]:
    """Both local and serving SmolLM2; the fault upstream comes first."""
    return [
        {"name": "flaky", "url": flaky.url, "locality": "local", "priority": 1, "models": [SMOL]},
        {"name": "peer", "url": f"{peer.url}/v1", "locality": "local", "priority": 10},
    ]


def chat_requests(upstream: FaultUpstream) -> list[object]:
    return [r for r in upstream.requests if r.path.endswith("/chat/completions")]


def served_by(front: Server, model: str, privacy: str | None = None, **body: object) -> tuple[str, str]:
    headers = {"X-Routing-Privacy": privacy} if privacy else {}
    response = httpx.post(
        f"{front.url}/v1/chat/completions",
        json={"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0, **body},
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-locopilot-provider"], response.json()["choices"][0]["message"]["content"]


def test_plain_names_go_to_the_first_local_provider_that_serves_them(front: Server) -> None:
    provider, text = served_by(front, SMOL)
    assert provider == "peer"
    assert "Paris" in text


def test_explicit_prefixes_including_ollama_tags(front: Server, ollama: OllamaStandIn) -> None:
    assert served_by(front, f"peer:{SMOL}")[0] == "peer"
    assert served_by(front, f"peer/{SMOL}")[0] == "peer"
    provider, text = served_by(front, "ollama:llama3.2:1b")
    assert provider == "ollama"
    assert text.startswith("Hello")
    # A tag with a colon whose prefix is not a provider is a plain model name.
    assert served_by(front, "qwen2.5:0.5b")[0] == "ollama"
    sent = [body for path, body in ollama.requests if path == "/api/chat"]
    assert sent[-1]["model"] == "qwen2.5:0.5b"
    assert "num_ctx" in sent[-1]["options"]


def test_openai_client_sees_where_a_reply_came_from(front: Server) -> None:
    client = front.client()
    raw = client.chat.completions.with_raw_response.create(model="ollama:qwen2.5:0.5b", messages=QUESTION)
    assert raw.headers["x-locopilot-provider"] == "ollama"
    assert raw.headers["x-locopilot-model"] == "qwen2.5:0.5b"
    assert raw.parse().choices[0].message.content


def test_remote_only_when_the_policy_allows(front: Server, flaky: FaultUpstream) -> None:
    assert served_by(front, "cloud-1", "any")[0] == "flaky"
    assert served_by(front, "cloud-1")[0] == "flaky"  # local_preferred: no local provider has it
    before = len(chat_requests(flaky))
    refused = httpx.post(
        f"{front.url}/v1/chat/completions",
        json={"model": "cloud-1", "messages": QUESTION},
        headers={"X-Routing-Privacy": "local_only"},
        timeout=30,
    )
    assert refused.status_code == 404
    explicit = httpx.post(
        f"{front.url}/v1/chat/completions",
        json={"model": "flaky:cloud-1", "messages": QUESTION},
        headers={"X-Routing-Privacy": "local_only"},
        timeout=30,
    )
    assert explicit.status_code == 403
    assert explicit.json()["error"]["code"] == "privacy_policy"
    assert len(chat_requests(flaky)) == before


def test_bad_privacy_header_is_400(front: Server) -> None:
    response = httpx.post(
        f"{front.url}/v1/chat/completions",
        json={"model": SMOL, "messages": QUESTION},
        headers={"X-Routing-Privacy": "whatever"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Routing-Privacy"


def test_local_only_never_reaches_the_remote_even_when_every_local_is_down(
    tmp_path_factory: pytest.TempPathFactory, flaky: FaultUpstream
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    front = front_server(
        tmp_path_factory,
        [
            {"name": "gone", "url": dead, "locality": "local", "priority": 10, "models": [SMOL]},
            {"name": "flaky", "url": flaky.url, "locality": "remote", "priority": 30, "models": [SMOL]},
        ],
    )
    try:
        response = httpx.post(
            f"{front.url}/v1/chat/completions",
            json={"model": SMOL, "messages": QUESTION, "max_tokens": 3},
            headers={"X-Routing-Privacy": "local_only"},
            timeout=60,
        )
        assert response.status_code == 503
        assert "gone" in response.json()["error"]["message"]
        assert chat_requests(flaky) == []
        # With local_preferred the same request falls back to the remote.
        assert served_by(front, SMOL)[0] == "flaky"
    finally:
        front.stop()


def test_failover_before_the_first_byte_and_the_log_says_why(
    tmp_path_factory: pytest.TempPathFactory, peer: Server, flaky: FaultUpstream
) -> None:
    flaky.mode = "status_500"
    front = front_server(
        tmp_path_factory,
        flaky_before_peer(flaky, peer),
    )
    try:
        client = front.client()
        raw = client.chat.completions.with_raw_response.create(model=SMOL, messages=QUESTION, max_tokens=5)
        assert raw.headers["x-locopilot-provider"] == "peer"
        assert len(chat_requests(flaky)) == 1
        stream = client.chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=5, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        (row,) = log_rows(front, "request_id = ?", raw.headers["x-request-id"])
        routing = json.loads(str(row["routing"]))
        assert routing["chosen"] == "peer"
        assert routing["failed"][0]["provider"] == "flaky"
        assert routing["policy"] == "local_preferred"
        stats = httpx.get(f"{front.url}/v1/engine/stats", timeout=30).json()
        for window in (stats["since_start"], stats["last_hour"]):
            assert window["requests"] == 2
            assert window["routing"]["failed_over"] == 2
            assert window["routing"]["chosen"] == {"peer": 2}
            assert window["routing"]["by_policy"] == {"local_preferred": 2}
            (failover,) = window["failovers"]
            assert failover["provider"] == "flaky"
            assert failover["count"] == 2
            (served,) = window["by_provider_model"]
            assert (served["provider"], served["model"], served["ok"]) == ("peer", SMOL, 2)
    finally:
        front.stop()


@pytest.mark.parametrize("mode", ["refuse", "status_429", "hang"])
def test_failover_on_connection_faults(
    tmp_path_factory: pytest.TempPathFactory, peer: Server, flaky: FaultUpstream, mode: str
) -> None:
    flaky.mode = mode
    # The peer's model loaded beforehand: a cold load on a busy machine can outlast the timeout.
    peer.client().chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=1)
    front = front_server(
        tmp_path_factory,
        flaky_before_peer(flaky, peer),
        LOCOPILOT_UPSTREAM_TIMEOUT="5",
    )
    try:
        assert served_by(front, SMOL)[0] == "peer"
    finally:
        front.stop()


def test_an_error_after_the_first_byte_is_an_sse_error_event(front: Server, flaky: FaultUpstream) -> None:
    flaky.mode = "die_after_3"
    client = front.client()
    stream = client.chat.completions.create(model="flaky:cloud-1", messages=QUESTION, stream=True)
    received: list[object] = []
    with pytest.raises(openai.APIError):
        received.extend(stream)
    assert received  # the first chunks arrived before the error; nothing was spliced from elsewhere
    texts = [c.choices[0].delta.content for c in received if c.choices]  # type: ignore[attr-defined]
    assert "Hello" in "".join(t or "" for t in texts)


def test_all_down_is_503_with_a_reason_for_each(tmp_path_factory: pytest.TempPathFactory, flaky: FaultUpstream) -> None:
    flaky.mode = "status_500"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    front = front_server(
        tmp_path_factory,
        [
            {"name": "gone", "url": dead, "locality": "local", "priority": 1, "models": ["m"]},
            {"name": "flaky", "url": flaky.url, "locality": "remote", "priority": 2, "models": ["m"]},
        ],
    )
    try:
        response = httpx.post(f"{front.url}/v1/chat/completions", json={"model": "m", "messages": QUESTION}, timeout=60)
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "gone" in message
        assert "flaky" in message
        assert response.headers["retry-after"]
    finally:
        front.stop()


@pytest.mark.parametrize("mode", ["status_401", "status_403"])
def test_an_explicit_remote_refusal_reaches_the_client_unchanged(
    front: Server, peer: Server, flaky: FaultUpstream, mode: str
) -> None:
    flaky.mode = mode
    response = httpx.post(
        f"{front.url}/v1/chat/completions", json={"model": f"flaky:{SMOL}", "messages": QUESTION}, timeout=30
    )
    assert response.status_code == int(mode[-3:])
    assert response.json()["error"]["code"] == "pro_subscription_required"
    assert response.json()["error"]["upgrade_url"]


def test_breaker_opens_and_recovers(
    tmp_path_factory: pytest.TempPathFactory, peer: Server, flaky: FaultUpstream
) -> None:
    flaky.mode = "status_500"
    front = front_server(
        tmp_path_factory,
        flaky_before_peer(flaky, peer),
        LOCOPILOT_PROBE_INTERVAL="0.5",
    )
    try:
        # Failed requests and failed probes (its /v1/models answers 500 too) both count.
        for _ in range(3):
            assert served_by(front, SMOL)[0] == "peer"
        assert len(chat_requests(flaky)) <= 3
        assert _provider(front, "flaky")["circuit"] == "open"
        tried = len(chat_requests(flaky))
        assert served_by(front, SMOL)[0] == "peer"
        assert len(chat_requests(flaky)) == tried  # the open breaker skipped it
        flaky.mode = "ok"
        for _ in range(100):
            if _provider(front, "flaky")["circuit"] == "closed":
                break
            time.sleep(0.1)
        assert _provider(front, "flaky")["circuit"] == "closed"
        assert served_by(front, SMOL)[0] == "flaky"
    finally:
        front.stop()


def _provider(front: Server, name: str) -> dict[str, object]:
    providers = front.engine_health()["providers"]
    assert isinstance(providers, list)
    (found,) = [p for p in providers if p["name"] == name]
    assert isinstance(found, dict)
    return found


def test_models_are_aggregated_with_provider_and_locality(front: Server) -> None:
    client = front.client()
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards[SMOL]["provider"] == "peer"
    assert cards[SMOL]["locality"] == "local"
    assert cards["llama3.2:1b"]["provider"] == "ollama"
    assert cards["cloud-1"]["provider"] == "flaky"
    assert cards["cloud-1"]["locality"] == "remote"
    assert client.models.retrieve("ollama:llama3.2:1b").id == "llama3.2:1b"
    assert client.models.retrieve("llama3.2:1b").model_dump()["provider"] == "ollama"


def test_upstream_keys_never_show(tmp_path_factory: pytest.TempPathFactory, flaky: FaultUpstream) -> None:
    secret = "sk-test-" + "9" * 24
    front = front_server(
        tmp_path_factory,
        [{"name": "flaky", "url": flaky.url, "locality": "remote", "priority": 1, "models": ["m"], "api_key": secret}],
    )
    try:
        served_by(front, "m")
        assert any(r.headers.get("authorization") == f"Bearer {secret}" for r in flaky.requests)
        flaky.mode = "status_500"
        httpx.post(f"{front.url}/v1/chat/completions", json={"model": "m", "messages": QUESTION}, timeout=30)
        for path in ("/v1/models", "/v1/engine/health"):
            assert secret not in httpx.get(f"{front.url}{path}", timeout=30).text
        front.stop()
        assert secret not in front.log()
    finally:
        front.stop()


def test_the_simple_url_settings(
    tmp_path_factory: pytest.TempPathFactory, ollama: OllamaStandIn, flaky: FaultUpstream
) -> None:
    front = start_server(
        tmp_path_factory,
        {},
        {
            "LOCOPILOT_OLLAMA_URL": ollama.url,
            "LOCOPILOT_REMOTE_URL": flaky.url,
            "LOCOPILOT_REMOTE_API_KEY": "sk-remote-key",
        },
    )
    try:
        assert served_by(front, "llama3.2:1b")[0] == "ollama"
        assert served_by(front, "fault-small")[0] == "remote"
        assert served_by(front, "remote:fault-large")[0] == "remote"
        assert chat_requests(flaky)[-1].headers["authorization"] == "Bearer sk-remote-key"  # type: ignore[attr-defined]
        providers = {p["name"]: p for p in front.engine_health()["providers"]}  # type: ignore[union-attr]
        assert providers["ollama"]["locality"] == "local"
        assert providers["remote"]["locality"] == "remote"
        assert "sk-remote-key" not in httpx.get(f"{front.url}/v1/engine/health", timeout=10).text
    finally:
        front.stop()
