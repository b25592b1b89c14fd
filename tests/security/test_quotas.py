"""Quotas: per-key requests and tokens per minute, and the cap on inference requests in flight.

The buckets' arithmetic is checked against a fake clock; the rest through a real
server in front of a scripted upstream, with the official openai client. The
server's clock is real, so a server test allows for what its buckets may refill
while it runs (one request per 6 s at 10 rpm) instead of assuming it is fast.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from locopilot.errors import Overloaded, RequestRateLimited, TokenRateLimited
from locopilot.gateway.auth import OPEN, Principal
from locopilot.gateway.ratelimit import RateLimiter, duration
from tests.conftest import Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import ADMIN, Key, create_key, keyed_server

CHAT = {"model": "fault-small", "messages": [{"role": "user", "content": "hi"}]}
#: What one fault-upstream completion uses: its prompt and its four words.
COMPLETION_TOKENS = FaultUpstream.PROMPT_TOKENS + len(FaultUpstream.WORDS)
DEFAULT_RPM = 3
LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


# The buckets, on a fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(rpm: int | None = None, tpm: int | None = None, key_id: str = "key_1") -> Principal:
    return Principal(key_id, "k", frozenset({"inference"}), rpm=rpm, tpm=tpm)


def test_requests_bucket_refills_one_per_sixtieth_of_the_limit() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    principal = key(rpm=3)
    for _ in range(3):
        limiter.admit(principal).finish(0)
    with pytest.raises(RequestRateLimited) as refused:
        limiter.admit(principal)
    assert refused.value.status_code == 429
    assert refused.value.body().error.type == "requests"
    assert refused.value.code == "rate_limit_exceeded"
    headers = refused.value.headers()
    assert headers["Retry-After"] == "20"  # one request per 20 s at 3 rpm
    assert headers["retry-after-ms"] == "20000"
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ratelimit-limit-tokens" not in headers
    clock.now += 19.9
    with pytest.raises(RequestRateLimited):
        limiter.admit(principal)
    clock.now += 0.1
    admission = limiter.admit(principal)
    assert admission.headers()["x-ratelimit-remaining-requests"] == "0"
    clock.now += 3600  # a long pause refills to the limit, no further
    assert admission.headers()["x-ratelimit-remaining-requests"] == "3"
    assert limiter.rejected == {"requests": 2, "tokens": 0, "concurrency": 0}


def test_tokens_are_charged_when_the_request_finishes_and_may_go_into_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    principal = key(tpm=60)  # one token a second
    first, second = limiter.admit(principal), limiter.admit(principal)  # nothing is charged yet
    first.finish(50)
    second.finish(40)
    second.finish(40)  # settled once
    with pytest.raises(TokenRateLimited) as refused:
        limiter.admit(principal)
    assert refused.value.body().error.type == "tokens"
    headers = refused.value.headers()
    assert headers["Retry-After"] == "31"  # 30 tokens of debt, then a hair past zero
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "60"
    assert headers["x-ratelimit-reset-tokens"] == "1m30s"
    clock.now += 30
    with pytest.raises(TokenRateLimited):
        limiter.admit(principal)  # empty is not enough: admitted above zero
    clock.now += 0.5
    limiter.admit(principal)


def test_a_refusal_takes_nothing_from_the_other_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    principal = key(rpm=2, tpm=10)
    limiter.admit(principal).finish(100)
    for _ in range(5):
        with pytest.raises(TokenRateLimited):
            limiter.admit(principal)
    clock.now += 600
    limiter.admit(principal)
    limiter.admit(principal)
    with pytest.raises(RequestRateLimited):
        limiter.admit(principal)


def test_concurrency_cap_counts_everyone_and_frees_on_finish() -> None:
    limiter = RateLimiter(max_concurrent=2, clock=Clock())
    admin = Principal("admin", "bootstrap admin", frozenset({"admin"}), rpm=1)
    held = [limiter.admit(OPEN), limiter.admit(admin)]
    with pytest.raises(Overloaded) as refused:
        limiter.admit(key(rpm=5))
    assert refused.value.status_code == 503
    assert refused.value.headers() == {"Retry-After": "1"}
    assert limiter.stats().in_flight == 2
    held[0].finish(0)
    held[0].finish(0)  # settled once: frees one place, not two
    limiter.admit(key(rpm=5))
    with pytest.raises(Overloaded):
        limiter.admit(OPEN)
    stats = limiter.stats()
    assert (stats.in_flight, stats.rejected_concurrency, stats.rejected_requests) == (2, 2, 0)


def test_who_gets_which_limits() -> None:
    limiter = RateLimiter(default_rpm=5, default_tpm=100, clock=Clock())
    assert limiter.limits_of(OPEN) == (None, None)
    assert limiter.limits_of(Principal("admin", "bootstrap admin", frozenset({"admin"}))) == (None, None)
    assert limiter.limits_of(key()) == (5, 100)
    assert limiter.limits_of(key(rpm=7)) == (7, 100)
    assert RateLimiter().limits_of(key()) == (None, None)
    assert limiter.admit(OPEN).headers() == {}
    for _ in range(50):
        limiter.admit(OPEN)


def test_durations_read_like_openai_headers() -> None:
    assert duration(0.0171) == "18ms"
    assert duration(6) == "6s"
    assert duration(8.64) == "8.64s"
    assert duration(360) == "6m0s"
    assert duration(90.5) == "1m30.5s"


# Through the server


def only_upstream(upstream: FaultUpstream) -> str:
    return json.dumps([{"name": "fault", "url": upstream.url, "locality": "local", "priority": 10}])


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, upstream: FaultUpstream) -> Iterator[Server]:
    """A keyed server in front of ``upstream`` only, where keys get 3 rpm unless they say otherwise."""
    running = keyed_server(
        tmp_path_factory.mktemp("quotas"),
        {"LOCOPILOT_UPSTREAMS": only_upstream(upstream), "LOCOPILOT_DEFAULT_RPM": str(DEFAULT_RPM)},
    )
    yield running
    running.stop()


def openai_client(server: Server, secret: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0, timeout=60)
    server.clients.append(client)
    return client


def generations(upstream: FaultUpstream) -> int:
    return sum(1 for r in upstream.requests if r.method == "POST" and r.path == "/v1/chat/completions")


def engine_stats(server: Server) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/engine/stats", headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def logged_429s(server: Server) -> int:
    """The 429s in the request log since the server started."""
    errors = engine_stats(server)["since_start"]["errors"]
    return sum(int(e["count"]) for e in errors if e["http_status"] == 429)


def wait_for_logged_429s(server: Server, wanted: int) -> int:
    """:func:`logged_429s`, once it reaches ``wanted`` or 30 s passed (rows are written behind the response)."""
    deadline = time.monotonic() + 30
    while (count := logged_429s(server)) < wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def assert_rate_limited(response: httpx.Response, kind: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (kind, "rate_limit_exceeded")
    assert int(response.headers["retry-after"]) >= 1


async def fire(server: Server, key: Key, count: int) -> tuple[list[httpx.Response], float]:
    """``count`` chat requests sent at once, each on its own connection; and how long they took."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.monotonic()
        responses = await asyncio.gather(
            *(client.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=key.headers) for _ in range(count))
        )
        return list(responses), time.monotonic() - started


def test_fifty_at_once_admit_exactly_the_rpm(limited: Server, upstream: FaultUpstream) -> None:
    rpm = 10
    key = create_key(limited, name="burst", rpm=rpm)
    before = generations(upstream)
    refused_before = engine_stats(limited)["limits"]["rejected_requests"]
    logged_before = logged_429s(limited)
    responses, elapsed = asyncio.run(fire(limited, key, 50))
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    # The bucket refills one request every 60/rpm seconds: a slow machine may earn one back.
    earned = math.floor(elapsed * rpm / 60)
    assert rpm <= len(admitted) <= rpm + earned, (len(admitted), elapsed)
    for response in refused:
        assert_rate_limited(response, "requests")
        assert response.headers["x-ratelimit-limit-requests"] == str(rpm)
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-ratelimit-limit-tokens" not in response.headers  # the key has no token limit
    for response in admitted:
        assert response.headers["x-ratelimit-limit-requests"] == str(rpm)
        assert response.json()["choices"][0]["message"]["content"] == "".join(FaultUpstream.WORDS)
    # Refused requests did no work, and each is counted and logged.
    assert generations(upstream) - before == len(admitted)
    assert engine_stats(limited)["limits"]["rejected_requests"] - refused_before == len(refused)
    assert wait_for_logged_429s(limited, logged_before + len(refused)) == logged_before + len(refused)


def test_tokens_per_minute_with_the_openai_client(limited: Server) -> None:
    tpm = 4  # a completion leaves 12 tokens of debt: three minutes to refill
    key = create_key(limited, name="tokens", tpm=tpm)
    client = openai_client(limited, key.secret)
    first = client.chat.completions.with_raw_response.create(
        model="fault-small", messages=[{"role": "user", "content": "hi"}]
    )
    usage = first.parse().usage
    assert usage is not None
    assert usage.total_tokens == COMPLETION_TOKENS  # more than the key's whole minute
    assert first.headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert first.headers["x-ratelimit-remaining-tokens"] == "0"
    assert first.headers["x-ratelimit-limit-requests"] == str(DEFAULT_RPM)  # the server's default
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="fault-small", messages=[{"role": "user", "content": "hi"}])
    error = refused.value
    assert error.status_code == 429
    assert error.type == "tokens"
    assert error.code == "rate_limit_exceeded"
    headers = error.response.headers
    for name in LIMIT_HEADERS:
        assert name in headers, name
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    # The debt (used minus limit) refills at tpm/60 a second: that long, or less as time passed.
    debt_seconds = (COMPLETION_TOKENS - tpm) * 60 / tpm
    assert 1 <= int(headers["retry-after"]) <= math.ceil(debt_seconds) + 1
    assert 0 < int(headers["retry-after-ms"]) <= debt_seconds * 1000 + 1000


def test_streamed_tokens_are_charged_too(limited: Server) -> None:
    key = create_key(limited, name="streamed", tpm=5)
    client = openai_client(limited, key.secret)
    with client.chat.completions.with_streaming_response.create(
        model="fault-small", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as response:
        assert response.headers["x-ratelimit-limit-tokens"] == "5"
        assert int(response.headers["x-ratelimit-remaining-requests"]) < DEFAULT_RPM
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == "".join(FaultUpstream.WORDS)
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model="fault-small", prompt="hi")
    assert refused.value.type == "tokens"


def test_embedding_tokens_are_charged(limited: Server) -> None:
    key = create_key(limited, name="embedder", tpm=5)
    client = openai_client(limited, key.secret)
    used = client.embeddings.create(model="fault-small", input=" ".join(["word"] * 20))
    assert used.usage.prompt_tokens == 20
    with pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(model="fault-small", input="again")
    assert refused.value.type == "tokens"


def test_default_rpm_applies_to_keys_and_not_to_the_admin(limited: Server, upstream: FaultUpstream) -> None:
    key = create_key(limited, name="defaulted")
    started = time.monotonic()
    statuses = [
        httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=key.headers, timeout=60).status_code
        for _ in range(DEFAULT_RPM + 2)
    ]
    earned = math.floor((time.monotonic() - started) * DEFAULT_RPM / 60)  # one every 20 s
    assert statuses[:DEFAULT_RPM] == [200] * DEFAULT_RPM
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) <= DEFAULT_RPM + earned
    assert 429 in statuses or earned >= 2
    for _ in range(DEFAULT_RPM * 4):
        response = httpx.post(f"{limited.url}/v1/chat/completions", json=CHAT, headers=ADMIN, timeout=60)
        assert response.status_code == 200, response.text
        assert not any(name in response.headers for name in LIMIT_HEADERS)
    # Other routes are not counted: the model list answers a key whose minute is spent.
    assert httpx.get(f"{limited.url}/v1/models", headers=key.headers, timeout=10).status_code == 200


# The cap on requests in flight


@pytest.fixture
def holding() -> Iterator[FaultUpstream]:
    """An upstream that holds every generation until told otherwise (its model list still answers)."""
    running = FaultUpstream().start()
    running.delay = 3600
    yield running
    running.stop()


async def hold_and_refuse(server: Server, upstream: FaultUpstream, cap: int, key: Key) -> None:
    """Hold ``cap`` requests in flight, see the next ones refused, then hang up on the held ones."""
    async with httpx.AsyncClient(timeout=120) as client:
        url = f"{server.url}/v1/chat/completions"
        held = [asyncio.create_task(client.post(url, json=CHAT, headers=key.headers)) for _ in range(cap)]
        deadline = time.monotonic() + 60
        while generations(upstream) < cap:
            assert time.monotonic() < deadline, "the held requests never reached the upstream"
            await asyncio.sleep(0.05)
        # The next one is refused without waiting for a place: it would wait an hour on this upstream.
        for headers in (key.headers, ADMIN):  # the admin is under the cap like everyone
            refused = await client.post(url, json=CHAT, headers=headers)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "too_many_concurrent_requests"
            assert refused.headers["retry-after"] == "1"
        assert generations(upstream) == cap
        stats = (await client.get(f"{server.url}/v1/engine/stats", headers=ADMIN)).json()["limits"]
        assert (stats["in_flight"], stats["max_concurrent_requests"]) == (cap, cap)
        assert stats["rejected_concurrency"] == 2
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)


def test_concurrency_cap(tmp_path: Path, holding: FaultUpstream) -> None:
    cap = 2
    server = keyed_server(
        tmp_path,
        {"LOCOPILOT_UPSTREAMS": only_upstream(holding), "LOCOPILOT_MAX_CONCURRENT_REQUESTS": str(cap)},
    )
    try:
        key = create_key(server, name="patient")
        asyncio.run(hold_and_refuse(server, holding, cap, key))
        # Clients that gave up freed their places.
        holding.delay = 0
        deadline = time.monotonic() + 60
        while engine_stats(server)["limits"]["in_flight"]:
            assert time.monotonic() < deadline, "places were not freed"
            time.sleep(0.05)
        response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=key.headers, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        server.stop()
