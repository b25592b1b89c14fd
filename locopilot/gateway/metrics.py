"""Prometheus metrics for ``GET /metrics``, in a registry owned by one app.

Two kinds, so that a request pays for no more than a few counter and histogram
observations:

- :class:`RequestMetrics`: counters and histograms added to once per inference
  request, when :class:`~locopilot.gateway.usage.UsageRecorder` records its outcome.
- :class:`StateCollector`: everything else, read from the objects that already
  hold it (router, model manager, rate limiter, database) when Prometheus scrapes.
  Counters that those objects keep (failovers, rate-limit refusals, runner
  restarts, dropped rows) are exposed as counters; current state as gauges.

Labels are bounded: a route is one of the three inference paths, a provider a
configured name (``none`` when no provider served the request), a status an
HTTP status code, and a model a name some provider lists (or the embedded engine
served, which means it has the file), at most :data:`MAX_MODEL_LABELS` of them;
any other model name, such as one a client made up, is counted as ``other``.
No label ever holds a key, a request id or a prompt.

Process CPU and memory come from prometheus_client's own ``ProcessCollector``
(the standard ``process_*`` names, which dashboards expect; Linux only).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from locopilot.engine.supervisor import ModelManager
    from locopilot.gateway.ratelimit import RateLimiter
    from locopilot.gateway.router import Router
    from locopilot.gateway.usage import Outcome
    from locopilot.store.db import Database

PREFIX = "locopilot"
OTHER = "other"
NONE = "none"
#: Model label values beyond this many are counted as ``other``: an upstream that
#: lists thousands of models must not make thousands of series.
MAX_MODEL_LABELS = 200
ROUTES = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
    "messages.count_tokens": "/v1/messages/count_tokens",
    "ollama.chat": "/api/chat",
    "ollama.generate": "/api/generate",
    "ollama.embed": "/api/embed",
    "ollama.embeddings": "/api/embeddings",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
CIRCUIT_STATES = ("closed", "open", "half_open")


class _Histogram:
    """Counts per bucket (the last one past every bound) and a sum; cumulated only when scraped."""

    __slots__ = ("counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # the first bound >= value: Prometheus's "le"
        self.total += value

    def buckets(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        # repr() writes these bounds as prometheus_client's floatToGoString does ("0.005", "1.0").
        les = [repr(float(b)) for b in bounds] + ["+Inf"]
        return list(zip(les, accumulate(self.counts), strict=True))


class _Series:
    """Everything counted for one (route, model, provider)."""

    __slots__ = ("completion_tokens", "first_token", "latency", "prompt_tokens", "statuses", "tokens_per_second")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.first_token = _Histogram(LATENCY_BUCKETS)
        self.tokens_per_second = _Histogram(TOKENS_PER_SECOND_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0


class RequestMetrics:
    """What each inference request adds, counted when its outcome is recorded.

    Plain ints and lists rather than prometheus_client's Counter and Histogram:
    those take a lock per observation, and six of them cost about 15 µs of CPU
    per request here, against about 2 µs for this. Everything runs on the event
    loop (recording and scraping alike), so nothing here needs a lock.
    prometheus_client still writes the exposition, from :meth:`collect`.

    ``known_model(provider, model)`` says whether ``model`` may be a label value
    (see the module docstring).
    """

    def __init__(self, known_model: Callable[[str, str], bool]) -> None:
        self.known_model = known_model
        self._models: set[str] = set()
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._tool_parse_failures: dict[str, int] = {}

    def model_label(self, provider: str, model: str) -> str:
        if model in self._models:
            return model
        if model and len(self._models) < MAX_MODEL_LABELS and self.known_model(provider, model):
            self._models.add(model)
            return model
        return OTHER

    def observe(self, outcome: Outcome, http_status: int, seconds: float) -> None:
        """Count one finished request that took ``seconds``."""
        provider = outcome.provider
        key = (ROUTES.get(outcome.endpoint, OTHER), self.model_label(provider, outcome.model), provider or NONE)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.statuses[http_status] = series.statuses.get(http_status, 0) + 1
        series.latency.observe(LATENCY_BUCKETS, seconds)
        ttfb = outcome.ttfb
        if ttfb is not None:
            series.first_token.observe(LATENCY_BUCKETS, ttfb)
            if outcome.tokens_out > 1 and seconds > ttfb and provider:
                series.tokens_per_second.observe(TOKENS_PER_SECOND_BUCKETS, (outcome.tokens_out - 1) / (seconds - ttfb))
        series.prompt_tokens += outcome.tokens_in
        series.completion_tokens += outcome.tokens_out
        if outcome.tool_parse_failures:
            model = key[1]
            self._tool_parse_failures[model] = self._tool_parse_failures.get(model, 0) + outcome.tool_parse_failures

    def collect(self) -> Iterator[Metric]:
        labels = ("route", "model", "provider")
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Inference requests by route, model, serving provider and the HTTP status the client got.",
            labels=(*labels, "status"),
        )
        latency = HistogramMetricFamily(
            f"{PREFIX}_request_duration_seconds",
            "Inference request time, from the handler's start until the reply is complete (or fails).",
            labels=labels,
        )
        first_token = HistogramMetricFamily(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from the handler's start to the provider's first event (the first token of a generation).",
            labels=labels,
        )
        tokens_per_second = HistogramMetricFamily(
            f"{PREFIX}_generation_tokens_per_second",
            "Generation speed of each completed reply of two tokens or more: tokens after the first, "
            "over the time after the first.",
            labels=labels,
        )
        prompt = CounterMetricFamily(
            f"{PREFIX}_prompt_tokens", "Prompt (input) tokens of recorded requests.", labels=labels
        )
        completion = CounterMetricFamily(
            f"{PREFIX}_completion_tokens", "Completion (output) tokens of recorded requests.", labels=labels
        )
        for key, series in list(self._series.items()):
            for status, count in list(series.statuses.items()):
                requests.add_metric((*key, str(status)), count)
            latency.add_metric(key, series.latency.buckets(LATENCY_BUCKETS), series.latency.total)
            first_token.add_metric(key, series.first_token.buckets(LATENCY_BUCKETS), series.first_token.total)
            tokens_per_second.add_metric(
                key, series.tokens_per_second.buckets(TOKENS_PER_SECOND_BUCKETS), series.tokens_per_second.total
            )
            prompt.add_metric(key, series.prompt_tokens)
            completion.add_metric(key, series.completion_tokens)
        parse_failures = CounterMetricFamily(
            f"{PREFIX}_tool_call_parse_failures",
            "Tool calls a model generated that could not be parsed (their text went out as content), by model.",
            labels=("model",),
        )
        for model, count in list(self._tool_parse_failures.items()):
            parse_failures.add_metric((model,), count)
        yield from (requests, latency, first_token, tokens_per_second, prompt, completion, parse_failures)


def resident_bytes(pid: int) -> int | None:
    """The resident memory of process ``pid`` from ``/proc`` (None where there is no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class StateCollector:
    """Gauges and kept counters, read from the live objects at scrape time (on the event loop)."""

    def __init__(
        self,
        router: Router,
        manager: ModelManager,
        limiter: RateLimiter,
        db: Database,
        engine_ready: Callable[[], bool],
    ) -> None:
        self.router = router
        self.manager = manager
        self.limiter = limiter
        self.db = db
        self.engine_ready = engine_ready

    def collect(self) -> Iterator[Metric]:
        yield from self._limits()
        yield from self._runners()
        yield from self._providers()
        yield from self._database()

    def _limits(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_in_flight_requests", "Inference requests admitted and not yet finished, all models."
        )
        in_flight.add_metric((), self.limiter.in_flight)
        yield in_flight
        rejected = CounterMetricFamily(
            f"{PREFIX}_rate_limit_rejections",
            "Requests refused by a quota: a key's requests (429) or tokens (429) per minute, "
            "or the cap on requests in flight (concurrency, 503).",
            labels=("limit",),
        )
        for limit, count in self.limiter.rejected.items():
            rejected.add_metric((limit,), count)
        yield rejected

    def _runners(self) -> Iterator[Metric]:
        label = ("model",)
        loaded = GaugeMetricFamily(f"{PREFIX}_model_loaded", "1 for each model loaded in a live runner.", labels=label)
        memory = GaugeMetricFamily(
            f"{PREFIX}_model_resident_memory_bytes",
            "Resident memory of each loaded model's runner process (the mapped weights it has touched included).",
            labels=label,
        )
        slots = GaugeMetricFamily(f"{PREFIX}_model_slots", "Requests a loaded model runs at once.", labels=label)
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_model_in_flight_requests", "Requests running in each model's runner.", labels=label
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}_model_queue_depth", "Requests waiting for a slot of each loaded model.", labels=label
        )
        for name, runner in list(self.manager.runners.items()):
            if not runner.alive:
                continue
            loaded.add_metric((name,), 1)
            slots.add_metric((name,), runner.ready.slots)
            in_flight.add_metric((name,), runner.in_flight)
            waiting.add_metric((name,), runner.waiting)
            rss = resident_bytes(runner.ready.pid)
            if rss is not None:
                memory.add_metric((name,), rss)
        yield from (loaded, memory, slots, in_flight, waiting)
        restarts = CounterMetricFamily(
            f"{PREFIX}_runner_restarts",
            "Runners started for a model whose previous runner had died (a crash, an abort, a kill).",
            labels=label,
        )
        for name, count in self.manager.restarts.items():
            restarts.add_metric((name,), count)
        yield restarts
        ready = GaugeMetricFamily(f"{PREFIX}_engine_ready", "1 when llama.cpp loaded and found a backend at startup.")
        ready.add_metric((), 1 if self.engine_ready() else 0)
        yield ready

    def _providers(self) -> Iterator[Metric]:
        label = ("provider",)
        now = self.router.clock()
        healthy = GaugeMetricFamily(
            f"{PREFIX}_provider_healthy",
            "1 when a provider can take requests: its circuit is closed and its last call did not fail "
            "(for the embedded engine: llama.cpp is ready).",
            labels=label,
        )
        circuit = GaugeMetricFamily(
            f"{PREFIX}_provider_circuit_state",
            "1 for the state each provider's circuit breaker is in (closed, open, half_open), 0 for the others.",
            labels=("provider", "state"),
        )
        failures = GaugeMetricFamily(
            f"{PREFIX}_provider_consecutive_failures", "Failures in a row of each provider.", labels=label
        )
        ttfb = GaugeMetricFamily(
            f"{PREFIX}_provider_first_event_seconds",
            "Each provider's smoothed time to first event over the last minute (what `any` routing orders by).",
            labels=label,
        )
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_provider_in_flight",
            "Requests each provider (each replica of a pool) is serving now, from the attempt to the end of the reply.",
            labels=label,
        )
        cap = GaugeMetricFamily(
            f"{PREFIX}_provider_max_concurrent",
            "The cap on requests at once of each provider that has one (`max_concurrent` in LOCOPILOT_UPSTREAMS).",
            labels=label,
        )
        for name, state in list(self.router.states.items()):
            in_flight.add_metric((name,), state.load.in_flight)
            if state.load.cap:
                cap.add_metric((name,), state.load.cap)
            current = state.breaker.state(now)
            ok = self.engine_ready() if state.local_engine else current == "closed" and state.breaker.failures == 0
            healthy.add_metric((name,), 1 if ok else 0)
            for value in CIRCUIT_STATES:
                circuit.add_metric((name, value), 1 if value == current else 0)
            failures.add_metric((name,), state.breaker.failures)
            ms = state.latency.fresh(now)
            if ms is not None:
                ttfb.add_metric((name,), ms / 1000)
        yield from (healthy, circuit, failures, ttfb, in_flight, cap)
        affinity = CounterMetricFamily(
            f"{PREFIX}_affinity_routes",
            "Requests with an affinity key (a session id or a conversation's fingerprint) served by a replica of a "
            "pool: `hit` by the replica the key ranks first (its prompt cache), `spill` by another, as that one "
            "was too busy, at its cap or failed.",
            labels=("provider", "outcome"),
        )
        for (name, outcome), count in list(self.router.affinity_routes.items()):
            affinity.add_metric((name, outcome), count)
        yield affinity
        failovers = CounterMetricFamily(
            f"{PREFIX}_failovers",
            "Requests moved on to the next provider after one failed before its first byte, "
            "by the provider that failed and why.",
            labels=("provider", "reason"),
        )
        for (name, reason), count in list(self.router.failovers.items()):
            failovers.add_metric((name, reason), count)
        yield failovers

    def _database(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            f"{PREFIX}_db_write_queue_depth", "Writes (log rows, audit events, key changes) waiting for the writer."
        )
        depth.add_metric((), self.db.queue_depth())
        yield depth
        dropped = CounterMetricFamily(
            f"{PREFIX}_db_dropped_rows",
            "Rows that could not be stored (request log, audit trail), by table; the server log says why.",
            labels=("table",),
        )
        for table, count in self.db.dropped_rows().items():
            dropped.add_metric((table,), count)
        yield dropped


class Metrics:
    """The app's metrics: its own registry (several apps in one process never share series)."""

    def __init__(
        self,
        router: Router,
        manager: ModelManager,
        limiter: RateLimiter,
        db: Database,
        engine_ready: Callable[[], bool],
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(router.knows)
        self.registry.register(self.requests)
        self.registry.register(StateCollector(router, manager, limiter, db, engine_ready))
        ProcessCollector(registry=self.registry)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (OpenMetrics, or Prometheus text), and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
