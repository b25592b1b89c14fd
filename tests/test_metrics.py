"""``GET /metrics``: scraped from a real server with prometheus_client's own text parser, before and after traffic.

The server runs SmolLM2 itself and has a scripted fault upstream (``flaky``, local)
listed first for the same model, so plain requests for SmolLM2 can fail over to the
engine; requests for ``embedded:<model>`` go to the engine directly.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from locopilot.engine.supervisor import ModelManager
from locopilot.gateway.metrics import MAX_MODEL_LABELS, Metrics, RequestMetrics
from locopilot.gateway.ratelimit import RateLimiter
from locopilot.gateway.router import Router
from locopilot.gateway.usage import Outcome
from locopilot.settings import load_settings
from locopilot.store.db import Database, StoreError
from tests.conftest import SMOL, Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import ADMIN, ADMIN_KEY, assert_forbidden, assert_unauthorized, create_key, keyed_server

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "Which city is the capital of France?"}]
LOCAL = f"embedded:{SMOL}"


class Scrape:
    """One scrape, parsed by prometheus_client's parser."""

    def __init__(self, text: str) -> None:
        self.samples: list[Sample] = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum over samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for s in self.matching(name, **labels))

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


def scrape(server: Server, headers: dict[str, str] | None = ADMIN) -> Scrape:
    response = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(response.text)


def chat(server: Server, model: str, **body: object) -> httpx.Response:
    payload = {"model": model, "messages": QUESTION, "max_tokens": 6, "temperature": 0, **body}
    return httpx.post(f"{server.url}{CHAT}", json=payload, headers=ADMIN, timeout=120)


@pytest.fixture(scope="module")
def flaky() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, flaky: FaultUpstream) -> Iterator[Server]:
    upstreams = [{"name": "flaky", "url": flaky.url, "locality": "local", "priority": -10, "models": [SMOL]}]
    env = {
        "LOCOPILOT_ADMIN_KEY": ADMIN_KEY,
        "LOCOPILOT_UPSTREAMS": json.dumps(upstreams),
        # No probe between a test's requests: only those requests move the breaker.
        "LOCOPILOT_PROBE_INTERVAL": "3600",
    }
    running = Server(tmp_path_factory.mktemp("metered"), {SMOL: smollm2_path}, env).start(path="/health")
    yield running
    running.stop()


def test_metrics_move_with_traffic(metered: Server) -> None:
    served = {"route": CHAT, "model": SMOL, "provider": "embedded"}
    before = scrape(metered)

    whole = chat(metered, LOCAL)
    assert whole.status_code == 200, whole.text
    usage = [whole.json()["usage"]]
    with httpx.stream(
        "POST",
        f"{metered.url}{CHAT}",
        json={
            "model": LOCAL,
            "messages": QUESTION,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=ADMIN,
        timeout=120,
    ) as streamed:
        assert streamed.status_code == 200
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    usage.append(json.loads(events[-2])["usage"])
    refused = chat(metered, LOCAL, temperature=5)
    assert refused.status_code == 400

    after = scrape(metered)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("locopilot_requests_total", **served, status="200") == 2
    assert moved("locopilot_requests_total", route=CHAT, status="400") == 1
    assert moved("locopilot_request_duration_seconds_count", **served) == 2
    assert moved("locopilot_request_duration_seconds_sum", **served) > 0
    assert moved("locopilot_time_to_first_token_seconds_count", **served) == 2
    assert moved("locopilot_prompt_tokens_total", **served) == sum(u["prompt_tokens"] for u in usage)
    assert moved("locopilot_completion_tokens_total", **served) == sum(u["completion_tokens"] for u in usage)
    long_enough = sum(1 for u in usage if u["completion_tokens"] > 1)
    assert moved("locopilot_generation_tokens_per_second_count", **served) == long_enough
    assert moved("locopilot_generation_tokens_per_second_sum", **served) > 0
    # A latency bucket counts what fits under it: the +Inf bucket holds every request.
    assert moved("locopilot_request_duration_seconds_bucket", **served, le="+Inf") == 2

    assert after.value("locopilot_model_loaded", model=SMOL) == 1
    assert after.value("locopilot_model_resident_memory_bytes", model=SMOL) > 10 * 2**20
    assert after.value("locopilot_model_slots", model=SMOL) >= 1
    assert after.value("locopilot_model_in_flight_requests", model=SMOL) == 0
    assert after.value("locopilot_model_queue_depth", model=SMOL) == 0
    assert after.value("locopilot_in_flight_requests") == 0
    assert after.matching("locopilot_db_write_queue_depth")
    assert after.value("locopilot_db_dropped_rows_total") == 0
    assert after.value("locopilot_provider_healthy", provider="flaky") == 1
    assert after.value("locopilot_provider_circuit_state", provider="flaky", state="closed") == 1
    assert after.value("process_resident_memory_bytes") > 10 * 2**20
    assert after.value("process_cpu_seconds_total") >= before.value("process_cpu_seconds_total") > 0


def test_rate_limited_requests_are_counted(metered: Server) -> None:
    key = create_key(metered, name="one-a-minute", rpm=1)
    before = scrape(metered)
    body = {"model": "no-such-model", "messages": QUESTION}
    first = httpx.post(f"{metered.url}{CHAT}", json=body, headers=key.headers, timeout=30)
    assert first.status_code == 404
    second = httpx.post(f"{metered.url}{CHAT}", json=body, headers=key.headers, timeout=30)
    assert second.status_code == 429
    after = scrape(metered)
    assert (
        after.value("locopilot_rate_limit_rejections_total", limit="requests")
        - before.value("locopilot_rate_limit_rejections_total", limit="requests")
        == 1
    )
    assert (
        after.value("locopilot_requests_total", status="429") - before.value("locopilot_requests_total", status="429")
        == 1
    )


def test_made_up_model_names_do_not_become_labels(metered: Server, flaky: FaultUpstream) -> None:
    flaky.mode = "ok"
    made_up = [f"bogus-{secrets.token_hex(6)}" for _ in range(50)]
    # Named on an upstream that answers any model name, they are served, and still no label.
    explicit = [f"flaky:bogus-{secrets.token_hex(6)}" for _ in range(5)]
    before = scrape(metered)
    for model in made_up:
        assert chat(metered, model).status_code == 404
    for model in explicit:
        reply = chat(metered, model)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-locopilot-provider"] == "flaky"
    after = scrape(metered)
    names = set(made_up) | {m.partition(":")[2] for m in explicit} | set(explicit)
    for metric in ("locopilot_requests_total", "locopilot_request_duration_seconds_count"):
        models = after.label_values(metric, "model")
        assert not models & names
        assert models <= {SMOL, "other"}
    other = {"route": CHAT, "model": "other"}
    assert after.value("locopilot_requests_total", **other, provider="none", status="404") - before.value(
        "locopilot_requests_total", **other, provider="none", status="404"
    ) == len(made_up)
    assert after.value("locopilot_requests_total", **other, provider="flaky", status="200") - before.value(
        "locopilot_requests_total", **other, provider="flaky", status="200"
    ) == len(explicit)
    series = len(after.matching("locopilot_requests_total"))
    assert series < 20, series


def test_failovers_by_reason_and_the_circuit(metered: Server, flaky: FaultUpstream) -> None:
    before = scrape(metered)
    try:
        for mode, reason in (("status_500", "upstream_5xx"), ("refuse", "connect")):
            flaky.mode = mode
            reply = chat(metered, SMOL, max_tokens=2)
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-locopilot-provider"] == "embedded"
            now = scrape(metered)
            assert (
                now.value("locopilot_failovers_total", provider="flaky", reason=reason)
                - before.value("locopilot_failovers_total", provider="flaky", reason=reason)
                == 1
            )
            assert now.value("locopilot_provider_healthy", provider="flaky") == 0
        flaky.mode = "status_500"
        assert chat(metered, SMOL, max_tokens=2).status_code == 200  # the third failure in a row opens it
        after = scrape(metered)
        assert after.value("locopilot_provider_consecutive_failures", provider="flaky") == 3
        assert after.value("locopilot_provider_circuit_state", provider="flaky", state="open") == 1
        assert after.value("locopilot_provider_circuit_state", provider="flaky", state="closed") == 0
        assert after.value("locopilot_provider_healthy", provider="embedded") in (0, 1)
        assert after.value("locopilot_requests_total", route=CHAT, model=SMOL, provider="embedded", status="200") >= 3
    finally:
        flaky.mode = "ok"


def test_a_runner_killed_is_counted_as_restarted(metered: Server) -> None:
    assert chat(metered, LOCAL).status_code == 200
    health = httpx.get(f"{metered.url}/v1/engine/health", headers=ADMIN, timeout=30).json()
    (runner,) = [r for r in health["engine"]["runners"] if r["model"] == SMOL]
    before = scrape(metered)
    os.kill(runner["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while scrape(metered).value("locopilot_model_loaded", model=SMOL) and time.monotonic() < deadline:
        time.sleep(0.2)
    reply = chat(metered, LOCAL)
    assert reply.status_code == 200, reply.text
    after = scrape(metered)
    restarts = "locopilot_runner_restarts_total"
    assert after.value(restarts, model=SMOL) - before.value(restarts, model=SMOL) == 1
    assert after.value("locopilot_model_loaded", model=SMOL) == 1


def test_metrics_need_the_admin_scope(metered: Server) -> None:
    url = f"{metered.url}/metrics"
    assert_unauthorized(httpx.get(url, timeout=10))
    inference = create_key(metered, name="inference-only", scopes=["inference"])
    assert_forbidden(httpx.get(url, headers=inference.headers, timeout=10), "insufficient_scope")
    admin = create_key(metered, name="operator", scopes=["admin"])
    assert httpx.get(url, headers=admin.headers, timeout=10).status_code == 200
    assert httpx.get(url, headers=ADMIN, timeout=10).status_code == 200


def test_public_metrics_need_no_key(tmp_path: Path) -> None:
    server = keyed_server(tmp_path / "server", {"LOCOPILOT_METRICS_PUBLIC": "true"})
    try:
        found = scrape(server, headers=None)
        assert found.matching("locopilot_in_flight_requests")
        inference = create_key(server, name="inference-only", scopes=["inference"])
        assert httpx.get(f"{server.url}/metrics", headers=inference.headers, timeout=10).status_code == 200
        wrong = "lcp_" + "W" * 43
        assert_unauthorized(httpx.get(f"{server.url}/metrics", headers={"x-api-key": wrong}, timeout=10), wrong)
        assert_unauthorized(httpx.get(f"{server.url}/v1/engine/stats", timeout=10))  # only /metrics opens
    finally:
        server.stop()


def test_rows_the_database_cannot_store_are_counted(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "state.db")
    try:
        future = db.insert("inference_logs", {"request_id": "r1"}, "a test row")  # NOT NULL columns missing
        with pytest.raises(StoreError):
            future.result(timeout=10)
        assert db.dropped_rows() == {"inference_logs": 1}
        assert db.queue_depth() == 0
    finally:
        db.close()
    with pytest.raises(StoreError):
        db.insert("audit_events", {"event": "x"}, "a test row")
    assert db.dropped_rows() == {"inference_logs": 1, "audit_events": 1}


def test_histogram_buckets_and_the_model_label_cap() -> None:
    seen: list[str] = []

    def known(provider: str, model: str) -> bool:
        seen.append(model)
        return not model.startswith("bogus")

    metrics = RequestMetrics(known)
    for seconds in (0.005, 0.0051, 1.0, 10_000.0):  # a bound is inside its own bucket ("le")
        metrics.observe(Outcome("r", "completions", "m", provider="p", ttfb=0.001, tokens_out=3), 200, seconds)
    registry = CollectorRegistry()
    registry.register(metrics)
    found = Scrape(generate_latest(registry).decode())
    series = {"route": "/v1/completions", "model": "m", "provider": "p"}
    buckets = {s.labels["le"]: s.value for s in found.matching("locopilot_request_duration_seconds_bucket", **series)}
    assert (buckets["0.005"], buckets["0.01"], buckets["1.0"], buckets["600.0"], buckets["+Inf"]) == (1, 2, 3, 3, 4)
    assert found.value("locopilot_request_duration_seconds_sum", **series) == pytest.approx(10_001.0101)
    assert found.value("locopilot_completion_tokens_total", **series) == 12
    assert found.value("locopilot_generation_tokens_per_second_count", **series) == 4

    assert [metrics.model_label("p", f"model-{i}") for i in range(MAX_MODEL_LABELS + 5)][-5:] == ["other"] * 5
    assert metrics.model_label("p", "model-0") == "model-0"
    assert metrics.model_label("p", "bogus") == "other"


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    async def build() -> tuple[bytes, bytes]:
        settings = load_settings({"LOCOPILOT_DATA_DIR": str(tmp_path)})
        db = Database.open(tmp_path / "state.db")
        try:
            async with anyio.create_task_group() as tasks:
                one, two = (
                    Metrics(Router([], "m"), ModelManager(settings, Path, tasks), RateLimiter(), db, lambda: True)
                    for _ in range(2)
                )
                one.requests.observe(Outcome("r", "embeddings", "m"), 404, 0.01)
                return one.exposition("")[0], two.exposition("")[0]
        finally:
            db.close()

    one, two = anyio.run(build)
    assert Scrape(one.decode()).value("locopilot_requests_total", status="404") == 1
    assert Scrape(two.decode()).value("locopilot_requests_total") == 0
    assert Scrape(two.decode()).matching("process_cpu_seconds_total")
    assert b"locopilot_" not in generate_latest(REGISTRY)
