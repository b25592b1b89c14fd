"""Pools of replicas behind a front locopilot: spread, in-flight counts, weights, caps, breakers,
failover inside the pool, and prompt-cache affinity.

The replicas are scripted OpenAI-compatible upstreams (:class:`FaultUpstream`, real sockets, the
real protocol) serving one model at one priority; the front is a real locopilot server driven
with the official openai client and httpx. The last test puts two real locopilot servers behind
the front and checks that a conversation's later turns reuse one replica's prompt cache.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOL, Server, start_server
from tests.fakes.fault_upstream import FaultUpstream
from tests.test_api import log_rows

MODEL = "pooled"


@pytest.fixture
def replicas() -> Iterator[list[FaultUpstream]]:
    started = [FaultUpstream().start() for _ in range(3)]
    yield started
    for upstream in started:
        upstream.stop()


def replica(name: str, upstream: FaultUpstream, priority: int = 10, **extra: object) -> dict[str, object]:
    return {"name": name, "url": upstream.url, "locality": "local", "priority": priority, "models": [MODEL], **extra}


@contextlib.contextmanager
def front(tmp_path_factory: pytest.TempPathFactory, upstreams: list[dict[str, object]], **env: str) -> Iterator[Server]:
    settings = {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams), "LOCOPILOT_METRICS_PUBLIC": "true", **env}
    running = start_server(tmp_path_factory, {}, settings)
    try:
        yield running
    finally:
        running.stop()


def ask(
    front: Server, content: str = "Hello?", headers: dict[str, str] | None = None, **body: object
) -> httpx.Response:
    response = httpx.post(
        f"{front.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": content}], **body},
        headers=headers or {},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def served_by(response: httpx.Response) -> str:
    return response.headers["x-locopilot-provider"]


def chats(upstream: FaultUpstream) -> int:
    return sum(r.path.endswith("/chat/completions") for r in upstream.requests)


def providers(front: Server) -> dict[str, dict[str, object]]:
    listed = front.engine_health()["providers"]
    assert isinstance(listed, list)
    return {str(p["name"]): p for p in listed}


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class HeldStreams:
    """Streamed requests that stay open (their replica stalls) until closed, or until the block ends."""

    def __init__(self, client: httpx.Client, stack: contextlib.ExitStack) -> None:
        self.client = client
        self.stack = stack
        self.open: list[httpx.Response] = []

    def __call__(self, front: Server, content: str = "Hello?", headers: dict[str, str] | None = None) -> str:
        """Open one; the replica that serves it."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": True}
        stream = self.client.stream("POST", f"{front.url}/v1/chat/completions", json=body, headers=headers or {})
        response = self.stack.enter_context(stream)
        assert response.status_code == 200
        self.open.append(response)
        return served_by(response)

    def close(self, replica: str) -> None:
        for response in [r for r in self.open if served_by(r) == replica]:
            response.close()
            self.open.remove(response)


@contextlib.contextmanager
def held_streams() -> Iterator[HeldStreams]:
    with contextlib.ExitStack() as stack:
        yield HeldStreams(stack.enter_context(httpx.Client(timeout=30)), stack)


def in_flight(front: Server) -> dict[str, object]:
    return {name: p["in_flight"] for name, p in providers(front).items() if name != "embedded"}


def logged(front: Server, request_id: str) -> dict[str, object]:
    rows: list[dict[str, object]] = []

    def found() -> bool:
        rows[:] = log_rows(front, "request_id = ?", request_id)
        return bool(rows)

    wait_for(found)
    return rows[0]


def test_both_replicas_of_a_pool_get_traffic(
    tmp_path_factory: pytest.TempPathFactory, replicas: list[FaultUpstream]
) -> None:
    a, b, lower = replicas
    upstreams = [replica("a", a), replica("b", b), replica("lower", lower, priority=20)]
    with front(tmp_path_factory, upstreams, LOCOPILOT_ROUTING_AFFINITY="off") as running:
        counts = Counter(served_by(ask(running)) for _ in range(24))
        assert set(counts) == {"a", "b"}  # each gets a share (each is chosen at random when both are idle)
        assert min(counts.values()) >= 3, counts
        assert chats(lower) == 0  # a lower priority is not part of the pool
        assert (chats(a), chats(b)) == (counts["a"], counts["b"])
        response = ask(running)
        row = logged(running, response.headers["x-request-id"])
        assert row["provider"] == served_by(response)  # the request log names the replica
        routing = json.loads(str(row["routing"]))
        assert sorted(routing["pool"]) == ["a", "b"]
        assert routing["pool"][0] == routing["chosen"] == served_by(response)
        assert routing["in_flight"] == {"a": 0, "b": 0}
        assert routing["affinity"] is None


def test_requests_in_flight_steer_the_next_ones(
    tmp_path_factory: pytest.TempPathFactory, replicas: list[FaultUpstream]
) -> None:
    a, b, _ = replicas
    for upstream in (a, b):
        upstream.mode = "stall_after_1"
    with front(tmp_path_factory, [replica("a", a), replica("b", b)], LOCOPILOT_ROUTING_AFFINITY="off") as running:
        with held_streams() as open_one:
            # Each new request goes to the replica with fewer open: the counts never differ by more than one.
            opened = [open_one(running) for _ in range(6)]
            for pair in range(3):
                assert sorted(opened[2 * pair : 2 * pair + 2]) == ["a", "b"], opened
            assert in_flight(running) == {"a": 3, "b": 3}
            metrics = httpx.get(f"{running.url}/metrics", timeout=10).text
            assert 'locopilot_provider_in_flight{provider="a"} 3.0' in metrics
            assert 'locopilot_provider_in_flight{provider="b"} 3.0' in metrics
            open_one.close("b")
            wait_for(lambda: in_flight(running) == {"a": 3, "b": 0})
            b.mode = "ok"
            # a is busier now: b takes everything new (its requests end at once, so it stays the less busy).
            assert {served_by(ask(running)) for _ in range(6)} == {"b"}
        # Closed by the client: no longer in flight.
        wait_for(lambda: in_flight(running) == {"a": 0, "b": 0})


def test_weights_zero_and_high(tmp_path_factory: pytest.TempPathFactory, replicas: list[FaultUpstream]) -> None:
    a, b, c = replicas
    upstreams = [replica("a", a, weight=0), replica("b", b, weight=9), replica("c", c, weight=1)]
    with front(tmp_path_factory, upstreams, LOCOPILOT_ROUTING_AFFINITY="off") as running:
        counts = Counter(served_by(ask(running)) for _ in range(40))
        assert counts["a"] == 0  # weight 0: drained while another replica can serve
        assert counts["b"] >= 28, counts  # about 36 of 40 expected
        assert counts["b"] > counts["c"]
        health = providers(running)
        assert (health["a"]["weight"], health["b"]["weight"]) == (0, 9)
        b.mode = c.mode = "status_500"
        assert served_by(ask(running)) == "a"  # ...but still serves when the others fail


def test_an_open_breaker_is_skipped_and_failover_stays_in_the_pool(
    tmp_path_factory: pytest.TempPathFactory, replicas: list[FaultUpstream]
) -> None:
    a, b, lower = replicas
    a.mode = "status_500"
    upstreams = [replica("a", a), replica("b", b), replica("lower", lower, priority=20)]
    env = {"LOCOPILOT_ROUTING_AFFINITY": "off", "LOCOPILOT_BREAKER_COOLDOWN": "600"}
    with front(tmp_path_factory, upstreams, **env) as running:
        failed_over = []
        for _ in range(12):
            response = ask(running)
            assert served_by(response) == "b"  # never the lower priority while b, in the pool, answers
            routing = json.loads(str(logged(running, response.headers["x-request-id"])["routing"]))
            if routing["failed"]:
                assert [f["provider"] for f in routing["failed"]] == ["a"]
                failed_over.append(routing)
        assert failed_over  # a was tried first at least once and the request moved on to b
        assert chats(lower) == 0
        wait_for(lambda: providers(running)["a"]["circuit"] == "open")
        tried = chats(a)
        for _ in range(8):
            response = ask(running)
            assert served_by(response) == "b"
        assert chats(a) == tried  # the open breaker kept a out of the pool
        routing = json.loads(str(logged(running, response.headers["x-request-id"])["routing"]))
        assert routing["skipped"][0]["provider"] == "a"
        b.mode = "status_500"
        assert served_by(ask(running)) == "lower"  # the pool is exhausted: the next priority, as before


def test_a_replica_stopped_under_load_fails_no_request(
    tmp_path_factory: pytest.TempPathFactory, replicas: list[FaultUpstream]
) -> None:
    a, b, c = replicas
    for upstream in replicas:
        upstream.delay = 0.05
    upstreams = [replica("a", a), replica("b", b), replica("c", c)]
    with front(tmp_path_factory, upstreams, LOCOPILOT_ROUTING_AFFINITY="off") as running:
        statuses: list[int] = []
        served: list[str] = []

        def load(worker: int) -> None:
            with httpx.Client(timeout=30) as client:
                for turn in range(10):
                    body = {"model": MODEL, "messages": [{"role": "user", "content": f"{worker}-{turn}"}]}
                    response = client.post(f"{running.url}/v1/chat/completions", json=body)
                    statuses.append(response.status_code)
                    served.append(response.headers.get("x-locopilot-provider", ""))

        workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for worker in workers:
            worker.start()
        wait_for(lambda: len(statuses) >= 8)
        a.mode = "refuse"  # a replica goes away mid-load
        for worker in workers:
            worker.join()
        assert statuses == [200] * 40
        assert {"b", "c"} <= set(served)


def test_affinity_keeps_a_conversation_on_one_replica(
    tmp_path_factory: pytest.TempPathFactory, replicas: list[FaultUpstream]
) -> None:
    a, b, _ = replicas
    with front(tmp_path_factory, [replica("a", a), replica("b", b)]) as running:
        homes: dict[int, set[str]] = {}
        for turn in range(3):
            for conversation in range(8):
                messages = [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"Conversation {conversation}: tell me about topic {conversation}."},
                ]
                for earlier in range(turn):
                    messages += [
                        {"role": "assistant", "content": f"Answer {earlier}."},
                        {"role": "user", "content": f"And then {earlier}?"},
                    ]
                response = httpx.post(
                    f"{running.url}/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=30
                )
                homes.setdefault(conversation, set()).add(served_by(response))
        assert all(len(home) == 1 for home in homes.values()), homes  # every turn on the first turn's replica
        assert {home for (home,) in homes.values()} == {"a", "b"}  # and the conversations spread over both
        routing = json.loads(str(logged(running, response.headers["x-request-id"])["routing"]))
        assert routing["affinity"] == "prefix"
        assert routing["affinity_to"] == routing["chosen"] == served_by(response)
        # An explicit session id outweighs the messages; so does OpenAI's `user` field.
        by_header = {served_by(ask(running, f"q{i}", headers={"X-Session-Id": "ticket-7"})) for i in range(6)}
        by_user = {served_by(ask(running, f"q{i}", user="someone@example.com")) for i in range(6)}
        assert len(by_header) == len(by_user) == 1
        metrics = httpx.get(f"{running.url}/metrics", timeout=10).text
        hits = re.findall(r'locopilot_affinity_routes_total\{outcome="hit",provider="(\w+)"\} (\d+)', metrics)
        assert sum(int(count) for _, count in hits) == 24 + 12
        assert {name for name, _ in hits} == {"a", "b"}
        routing = httpx.get(f"{running.url}/v1/engine/stats", timeout=30).json()["since_start"]["routing"]
        assert sum(routing["affinity_hits"].values()) == 24 + 12
        assert routing["affinity_spills"] == {}


def test_affinity_spills_when_its_replica_is_busy_or_capped(
    tmp_path_factory: pytest.TempPathFactory, replicas: list[FaultUpstream]
) -> None:
    a, b, _ = replicas
    for upstream in (a, b):
        upstream.mode = "stall_after_1"
    session = {"X-Session-Id": "conversation-1"}
    with front(tmp_path_factory, [replica("a", a), replica("b", b)]) as running:
        with held_streams() as open_one:
            home = open_one(running, headers=session)
            other = "b" if home == "a" else "a"
            # Not overloaded with one more (2 of 3 in flight is within 1.25 times its half share): kept.
            assert open_one(running, headers=session) == home
            # A third would be 3 of 3: over its bound, so it spills to the idle replica.
            assert open_one(running, headers=session) == other
        wait_for(lambda: in_flight(running) == {"a": 0, "b": 0})
    capped = [replica("a", a, max_concurrent=1), replica("b", b, max_concurrent=1)]
    with front(tmp_path_factory, capped) as running:
        with held_streams() as open_one:
            home = open_one(running, headers=session)
            other = "b" if home == "a" else "a"
            assert open_one(running, headers=session) == other  # its replica is at its cap of 1
            assert providers(running)[home]["max_concurrent"] == 1
            # Both at their caps: a 503 with Retry-After, and nothing sent to either.
            sent = chats(a) + chats(b)
            response = httpx.post(
                f"{running.url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "Hello?"}]},
                headers=session,
                timeout=30,
            )
            assert response.status_code == 503
            assert "at its cap of 1" in response.json()["error"]["message"]
            assert response.headers["retry-after"]
            assert chats(a) + chats(b) == sent
        wait_for(lambda: in_flight(running) == {"a": 0, "b": 0})
        a.mode = b.mode = "ok"
        response = ask(running, headers=session)
        assert served_by(response) == home  # back to the replica with the conversation's cache
        metrics = httpx.get(f"{running.url}/metrics", timeout=10).text
        assert f'locopilot_affinity_routes_total{{outcome="spill",provider="{other}"}} 1.0' in metrics
        assert 'locopilot_provider_max_concurrent{provider="a"} 1.0' in metrics
        routing = httpx.get(f"{running.url}/v1/engine/stats", timeout=30).json()["since_start"]["routing"]
        assert routing["affinity_spills"] == {other: 1}
        assert routing["affinity_hits"][home] >= 2


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[list[Server]]:
    started = [start_server(tmp_path_factory, {SMOL: smollm2_path}) for _ in range(2)]
    yield started
    for running in started:
        running.stop()


def test_later_turns_reuse_the_prompt_cache_of_one_embedded_replica(
    tmp_path_factory: pytest.TempPathFactory, engines: list[Server]
) -> None:
    upstreams = [
        {"name": f"box{i}", "url": f"{engine.url}/v1", "locality": "local", "priority": 10}
        for i, engine in enumerate(engines)
    ]
    with front(tmp_path_factory, upstreams) as running:
        client = running.client()
        story = "The lighthouse keeper counted ships every night and wrote their names in a blue book. " * 6
        messages = [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": f"{story}\nWhat did the keeper count?"},
        ]
        served, cached = [], []
        for turn in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model=SMOL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
            )
            reply = raw.parse()
            served.append(raw.headers["x-locopilot-provider"])
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            cached.append(reply.usage.prompt_tokens_details.cached_tokens or 0)
            messages += [
                {"role": "assistant", "content": reply.choices[0].message.content or ""},
                {"role": "user", "content": f"And on night {turn + 2}?"},
            ]
        assert len(set(served)) == 1, served
        assert cached[1] > 100 and cached[2] > cached[1], cached
        stats = httpx.get(f"{running.url}/v1/engine/stats", timeout=30).json()["since_start"]
        (row,) = stats["by_provider_model"]
        assert (row["provider"], row["tokens_cached"]) == (served[0], cached[0] + cached[1] + cached[2])


def workers_of(pid: int) -> str:
    """The child processes of granian's main process (its worker)."""
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().strip()


def test_sighup_reloads_the_upstreams_file_under_load(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, replicas: list[FaultUpstream]
) -> None:
    a, b, _ = replicas
    listing = tmp_path / "upstreams.json"
    listing.write_text(json.dumps([replica("a", a)]))
    env = {"LOCOPILOT_UPSTREAMS_FILE": str(listing), "LOCOPILOT_ROUTING_AFFINITY": "off"}
    statuses: list[int] = []
    stop = threading.Event()
    workers: list[threading.Thread] = []
    running = start_server(tmp_path_factory, {}, env)
    try:
        assert served_by(ask(running)) == "a"
        assert running.process is not None
        worker_pids = workers_of(running.process.pid)

        def load() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello?"}]}
                    statuses.append(client.post(f"{running.url}/v1/chat/completions", json=body).status_code)

        a.delay = 1.0  # a's answers are in flight when it is removed
        workers += [threading.Thread(target=load) for _ in range(3)]
        for thread in workers:
            thread.start()
        wait_for(lambda: in_flight(running).get("a", 0) > 0)
        listing.write_text(json.dumps([replica("b", b)]))
        running.process.send_signal(signal.SIGHUP)
        wait_for(lambda: set(in_flight(running)) == {"b"})
        served = chats(a)
        wait_for(lambda: len(statuses) >= 12)
        assert chats(a) == served  # nothing new reaches a removed upstream
        listing.write_text("[not json")  # a bad file changes nothing
        running.process.send_signal(signal.SIGHUP)
        # The whole log: Server.log() is its last 5000 characters, which the load's access lines fill.
        wait_for(lambda: "upstreams not reloaded" in running.log_path.read_text(errors="replace"))
        listing.write_text(json.dumps([replica("a", a), replica("b", b)]))
        running.process.send_signal(signal.SIGHUP)
        wait_for(lambda: set(in_flight(running)) == {"a", "b"})
        wait_for(lambda: chats(a) > served)  # back in the pool
        stop.set()
        for thread in workers:
            thread.join()
        assert statuses and set(statuses) == {200}  # no request failed, the ones in flight on a included
        assert workers_of(running.process.pid) == worker_pids  # reloaded in place, not restarted
        assert served_by(ask(running)) in ("a", "b")
    finally:
        stop.set()  # also when an assertion failed: the load must not outlive the server
        for thread in workers:
            thread.join()
        running.stop()
