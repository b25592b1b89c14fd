"""``X-Routing-Privacy: any`` prefers the fastest healthy provider; the other policies keep priority.

Through a real front locopilot: two scripted upstreams serve the same model,
the higher-priority one ``slow`` (it waits before the first byte of every
answer), the other ``fast``. Which provider served says what routing chose;
no test asserts a duration. The ordering rule itself is also checked on a
Router built directly, with a clock the test moves.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator

import anyio
import httpx
import msgspec
import openai
import pytest

from locopilot.gateway.router import (
    LATENCY_TRIAL_GAP,
    LATENCY_TTL,
    Decision,
    Plan,
    ProviderState,
    Route,
    Router,
)
from locopilot.providers.base import EmbeddingResult, GenerationRequest, Locality, StreamEvent
from locopilot.settings import Privacy
from tests.conftest import Server, start_server
from tests.fakes.fault_upstream import FaultUpstream
from tests.test_api import wait_for_log_row

MODEL = "shared-model"
QUESTION = [{"role": "user", "content": "Which city is the capital of France?"}]
SLOW_DELAY = 0.5


@pytest.fixture(scope="module")
def slow() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream()
    upstream.delay = SLOW_DELAY
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def fast() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


def front_of(tmp_path_factory: pytest.TempPathFactory, slow: FaultUpstream, fast: FaultUpstream) -> Server:
    upstreams = [
        {"name": "slow", "url": slow.url, "locality": "local", "priority": 1, "models": [MODEL]},
        {"name": "fast", "url": fast.url, "locality": "local", "priority": 2, "models": [MODEL]},
    ]
    return start_server(tmp_path_factory, {}, {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams)})


@pytest.fixture
def fresh_front(tmp_path_factory: pytest.TempPathFactory, slow: FaultUpstream, fast: FaultUpstream) -> Iterator[Server]:
    """A front that has measured nothing yet."""
    running = front_of(tmp_path_factory, slow, fast)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, slow: FaultUpstream, fast: FaultUpstream) -> Iterator[Server]:
    """A front shared by the tests that first measure both upstreams themselves (see :func:`measured`)."""
    running = front_of(tmp_path_factory, slow, fast)
    yield running
    running.stop()


def measured(client: openai.OpenAI) -> None:
    """Send ``any`` requests until both upstreams have a fresh measurement, whatever was measured before:
    at most one trial of each, then the fast one serves."""
    for _ in range(2):
        served_by(client, privacy="any")
    assert served_by(client, privacy="any") == "fast"


def served_by(client: openai.OpenAI, model: str = MODEL, privacy: str | None = None, stream: bool = False) -> str:
    """The provider that served one chat request (its answer checked, streamed or whole)."""
    headers = {"X-Routing-Privacy": privacy} if privacy else {}
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, max_tokens=8, stream=stream, extra_headers=headers
    )
    reply = raw.parse()
    if isinstance(reply, openai.Stream):
        assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    else:
        assert reply.choices[0].message.content
    return raw.headers["x-locopilot-provider"]


def routing_of(front: Server, client: openai.OpenAI, privacy: str) -> tuple[str, dict[str, object]]:
    """Who served one request under ``privacy``, and the routing decision stored with its log row."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=8, extra_headers={"X-Routing-Privacy": privacy}
    )
    row = wait_for_log_row(front, raw.headers["x-request-id"])
    routing: dict[str, object] = json.loads(str(row["routing"]))
    return raw.headers["x-locopilot-provider"], routing


def test_any_measures_each_provider_then_prefers_the_fast_one(fresh_front: Server) -> None:
    front = fresh_front
    client = front.client()
    # Nothing measured yet: each provider is tried once, in priority order, so it gets measured.
    provider, first = routing_of(front, client, "any")
    assert provider == "slow"
    assert first["order"] == "latency"
    assert first["measuring"] == ["slow", "fast"]
    provider, second = routing_of(front, client, "any")
    assert provider == "fast"
    assert second["measuring"] == ["fast"]
    known = second["latency_ms"]
    assert isinstance(known, dict)
    assert list(known) == ["slow"]
    # Both measured: the fast one serves, though its priority is lower.
    assert [served_by(client, privacy="any", stream=stream) for stream in (False, True, False)] == ["fast"] * 3
    provider, later = routing_of(front, client, "any")
    assert provider == "fast"
    assert later["candidates"] == ["fast", "slow"]
    assert later["measuring"] == []
    latency = later["latency_ms"]
    assert isinstance(latency, dict)
    assert set(latency) == {"slow", "fast"}
    assert latency["fast"] < latency["slow"]
    providers = front.engine_health()["providers"]
    assert isinstance(providers, list)
    health = {p["name"]: p for p in providers}
    assert health["fast"]["ttfb_ms"] is not None
    assert health["slow"]["ttfb_ms"] is not None
    assert health["embedded"]["ttfb_ms"] is None


def test_other_policies_keep_priority_order_once_the_fast_one_is_known(front: Server) -> None:
    client = front.client()
    measured(client)
    assert served_by(client) == "slow"  # the default policy, local_preferred
    assert served_by(client, privacy="local_preferred") == "slow"
    assert served_by(client, privacy="local_only", stream=True) == "slow"
    provider, routing = routing_of(front, client, "local_preferred")
    assert provider == "slow"
    assert routing["order"] == "priority"
    assert routing["candidates"] == ["slow", "fast"]
    assert routing["latency_ms"] == {}


def test_an_explicit_prefix_goes_where_it_says_under_any(front: Server) -> None:
    client = front.client()
    measured(client)
    assert served_by(client, f"slow:{MODEL}", privacy="any") == "slow"
    assert served_by(client, f"fast/{MODEL}") == "fast"


def test_stats_still_read_decisions_with_latency(front: Server) -> None:
    """One writer thread stores rows in order: once a request's row is there, every earlier one is."""

    def routing_stats() -> dict[str, dict[str, int]]:
        stats = httpx.get(f"{front.url}/v1/engine/stats", timeout=10).json()
        routing: dict[str, dict[str, int]] = stats["since_start"]["routing"]
        return routing

    client = front.client()
    measured(client)
    assert routing_of(front, client, "any")[0] == "fast"
    before = routing_stats()
    assert served_by(client, privacy="any") == "fast"
    assert routing_of(front, client, "local_preferred")[0] == "slow"
    after = routing_stats()
    assert after["by_policy"]["any"] == before["by_policy"]["any"] + 1
    assert after["by_policy"].get("local_preferred", 0) == before["by_policy"].get("local_preferred", 0) + 1
    assert after["chosen"]["fast"] == before["chosen"]["fast"] + 1
    assert after["chosen"]["slow"] == before["chosen"]["slow"] + 1


# The ordering rule, on a Router built directly


class Idle:
    """A provider the router only names; routing never calls it when its models are configured."""

    def __init__(self, name: str, locality: Locality = "local") -> None:
        self.name = name
        self.locality: Locality = locality

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        raise AssertionError("not called")
        yield

    async def embed(self, model: str, inputs: list[str]) -> EmbeddingResult:
        raise AssertionError("not called")

    async def models(self) -> list[str]:
        raise AssertionError("not called")

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def three_providers(clock: Clock) -> Router:
    """a, b and c serve "m", in that priority order; c is remote."""
    states = [
        ProviderState(Idle("a"), 1, ("m",)),
        ProviderState(Idle("b"), 2, ("m",)),
        ProviderState(Idle("c", "remote"), 3, ("m",)),
    ]
    return Router(states, "m", clock=clock)


def plan(router: Router, model: str, policy: Privacy) -> Plan:
    async def planned() -> Plan:
        return await router.plan(model, policy)

    return anyio.run(planned)


def order(router: Router, policy: Privacy = "any", model: str = "m") -> list[str]:
    return plan(router, model, policy).decision.candidates


def measure(router: Router, **seconds: float) -> None:
    for name, value in seconds.items():
        router.succeeded(Route(router.states[name].provider, "m"), value)


def test_unmeasured_providers_go_first_one_trial_at_a_time() -> None:
    clock = Clock()
    router = three_providers(clock)
    decision = plan(router, "m", "any").decision
    assert decision.candidates == ["a", "b", "c"]
    assert decision.measuring == ["a", "b", "c"]
    # a is being measured by that request: the next ones measure b, then c.
    assert order(router) == ["b", "c", "a"]
    assert order(router) == ["c", "a", "b"]
    # Every trial under way, nothing measured: priority order.
    assert order(router) == ["a", "b", "c"]
    # A trial that never reports back is tried again after the gap.
    clock.now += LATENCY_TRIAL_GAP
    assert plan(router, "m", "any").decision.measuring == ["a", "b", "c"]


def test_measured_providers_are_ordered_by_smoothed_latency() -> None:
    clock = Clock()
    router = three_providers(clock)
    measure(router, a=0.300, b=0.010, c=0.100)
    decision = plan(router, "m", "any").decision
    assert decision.candidates == ["b", "c", "a"]
    assert decision.order == "latency"
    assert decision.latency_ms == {"b": 10.0, "c": 100.0, "a": 300.0}
    assert decision.measuring == []
    # An average, not the last sample: one slow answer from b does not put it behind c.
    measure(router, b=0.200)
    assert router.states["b"].latency.ms == pytest.approx(10 + 0.3 * 190)
    assert order(router) == ["b", "c", "a"]
    # Equal latencies keep priority order.
    router.states["a"].latency.ms = router.states["b"].latency.ms
    assert order(router)[:2] == ["a", "b"]


def test_a_stale_measurement_is_taken_again_and_starts_over() -> None:
    clock = Clock()
    router = three_providers(clock)
    measure(router, a=2.0, b=0.010, c=0.100)  # a was loading a model
    assert order(router) == ["b", "c", "a"]
    clock.now += LATENCY_TTL / 2
    measure(router, b=0.010, c=0.100)
    clock.now += LATENCY_TTL / 2
    decision = plan(router, "m", "any").decision
    assert decision.candidates == ["a", "b", "c"]  # a is due a new measurement; b and c are fresh
    assert decision.measuring == ["a"]
    measure(router, a=0.005)
    assert router.states["a"].latency.ms == pytest.approx(5.0)  # not blended with the stale 2 s
    assert order(router) == ["a", "b", "c"]


def test_priority_policies_explicit_names_and_open_circuits_ignore_latency() -> None:
    clock = Clock()
    router = three_providers(clock)
    measure(router, a=0.300, b=0.100, c=0.010)
    assert order(router, "local_preferred") == ["a", "b", "c"]
    assert order(router, "local_only") == ["a", "b"]
    explicit = plan(router, "a:m", "any").decision
    assert explicit.candidates == ["a"]
    assert explicit.order == "priority"
    assert explicit.latency_ms == {}
    router.states["c"].breaker.opened_at = clock.now
    assert order(router) == ["b", "a"]


def test_a_decision_without_the_new_fields_still_decodes() -> None:
    old = b'{"policy": "any", "requested": "m", "candidates": ["a"], "chosen": "a"}'
    decision = msgspec.json.decode(old, type=Decision)
    assert decision.order == "priority"
    assert decision.latency_ms == {}
