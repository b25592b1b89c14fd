"""Request statistics from the request log, for ``GET /v1/engine/stats``."""

from __future__ import annotations

import apsw
import msgspec

from locopilot.store.db import Database


class ProviderModelStats(msgspec.Struct):
    provider: str
    model: str
    requests: int
    ok: int
    errors: int
    cancelled: int
    tokens_in: int
    tokens_out: int
    avg_latency_ms: float | None
    avg_ttfb_ms: float | None
    tokens_cached: int = 0
    """Of ``tokens_in``, those the provider's prompt cache supplied (what affinity to a replica buys)."""


class ErrorStats(msgspec.Struct):
    http_status: int
    error: str
    count: int


class FailoverStats(msgspec.Struct):
    """A provider that failed before the first byte, why, and how often."""

    provider: str
    reason: str
    count: int


class RoutingStats(msgspec.Struct):
    """``failed_over``: requests served by another candidate after one failed. ``affinity_hits`` and
    ``affinity_spills``, by the replica that served: requests with an affinity key served by the replica
    the key ranks first, or by another (its pool's, or on failover a lower priority's)."""

    decided: int
    explicit: int
    failed_over: int
    by_policy: dict[str, int]
    chosen: dict[str, int]
    affinity_hits: dict[str, int] = {}
    affinity_spills: dict[str, int] = {}


class WindowStats(msgspec.Struct):
    since: float
    requests: int
    by_provider_model: list[ProviderModelStats]
    errors: list[ErrorStats]
    routing: RoutingStats
    failovers: list[FailoverStats]


def window(db: Database, since: float) -> WindowStats:
    """Statistics over rows created at or after ``since`` (unix seconds). Blocks: run it in a thread."""

    def fetch(conn: apsw.Connection) -> WindowStats:
        total = int(conn.execute("SELECT count(*) FROM inference_logs WHERE created_at >= ?", (since,)).get or 0)
        by_provider_model = [
            ProviderModelStats(*row)
            for row in conn.execute(
                """SELECT provider, model, count(*),
                          sum(status = 'ok'), sum(status = 'error'), sum(status = 'cancelled'),
                          sum(tokens_in), sum(tokens_out), avg(latency_ms), avg(ttfb_ms), sum(tokens_cached)
                   FROM inference_logs WHERE created_at >= ?
                   GROUP BY provider, model ORDER BY count(*) DESC, provider, model""",
                (since,),
            )
        ]
        errors = [
            ErrorStats(*row)
            for row in conn.execute(
                """SELECT http_status, coalesce(error, ''), count(*) FROM inference_logs
                   WHERE created_at >= ? AND status = 'error'
                   GROUP BY http_status, error ORDER BY count(*) DESC LIMIT 50""",
                (since,),
            )
        ]
        decided, explicit, failed_over = (
            int(value or 0)
            for value in conn.execute(
                """SELECT count(*), sum(routing ->> '$.explicit'),
                          sum(json_array_length(routing, '$.failed') > 0 AND routing ->> '$.chosen' IS NOT NULL)
                   FROM inference_logs WHERE created_at >= ? AND routing IS NOT NULL""",
                (since,),
            ).fetchall()[0]
        )
        by_policy = {
            str(policy): int(count or 0)
            for policy, count in conn.execute(
                """SELECT routing ->> '$.policy', count(*) FROM inference_logs
                   WHERE created_at >= ? AND routing IS NOT NULL GROUP BY 1""",
                (since,),
            )
        }
        chosen = {
            str(provider): int(count or 0)
            for provider, count in conn.execute(
                """SELECT routing ->> '$.chosen', count(*) FROM inference_logs
                   WHERE created_at >= ? AND routing ->> '$.chosen' IS NOT NULL GROUP BY 1""",
                (since,),
            )
        }
        affinity: dict[bool, dict[str, int]] = {True: {}, False: {}}
        for provider, hit, count in conn.execute(
            """SELECT routing ->> '$.chosen', routing ->> '$.chosen' = routing ->> '$.affinity_to', count(*)
               FROM inference_logs
               WHERE created_at >= ? AND routing ->> '$.affinity_to' IS NOT NULL AND routing ->> '$.chosen' IS NOT NULL
               GROUP BY 1, 2""",
            (since,),
        ):
            affinity[bool(hit)][str(provider)] = int(count or 0)
        failovers = [
            FailoverStats(*row)
            for row in conn.execute(
                """SELECT failed.value ->> '$.provider', failed.value ->> '$.reason', count(*)
                   FROM inference_logs, json_each(inference_logs.routing, '$.failed') AS failed
                   WHERE created_at >= ? AND routing IS NOT NULL
                   GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 50""",
                (since,),
            )
        ]
        return WindowStats(
            since=since,
            requests=total,
            by_provider_model=by_provider_model,
            errors=errors,
            routing=RoutingStats(decided, explicit, failed_over, by_policy, chosen, affinity[True], affinity[False]),
            failovers=failovers,
        )

    return db.read(fetch)


class KeyModelUsage(msgspec.Struct):
    """Usage of one model by one key (``key_id`` None: requests without a key, in open mode)."""

    key_id: str | None
    key_name: str | None
    model: str
    requests: int
    ok: int
    errors: int
    tokens_in: int
    tokens_out: int
    avg_latency_ms: float | None


def usage_by_key(db: Database, since: float) -> list[KeyModelUsage]:
    """Usage per key and model over rows created at or after ``since``. Blocks: run it in a thread."""

    def fetch(conn: apsw.Connection) -> list[KeyModelUsage]:
        return [
            KeyModelUsage(*row)
            for row in conn.execute(
                """SELECT logs.key_id, keys.name, logs.model, count(*), sum(logs.status = 'ok'),
                          sum(logs.status = 'error'), sum(logs.tokens_in), sum(logs.tokens_out),
                          avg(logs.latency_ms)
                   FROM inference_logs AS logs LEFT JOIN api_keys AS keys ON keys.id = logs.key_id
                   WHERE logs.created_at >= ?
                   GROUP BY logs.key_id, logs.model
                   ORDER BY sum(logs.tokens_in + logs.tokens_out) DESC, count(*) DESC, logs.model""",
                (since,),
            )
        ]

    return db.read(fetch)


class TrafficSeries(msgspec.Struct):
    """One provider and model over a window, in ``bucket_seconds`` buckets from ``since`` (oldest first).

    ``tokens_per_second``: completion tokens over the generation time of the bucket's successful
    requests (latency less time to first token), null where there were none.
    """

    provider: str
    model: str
    requests: list[int]
    errors: list[int]
    tokens_out: list[int]
    tokens_per_second: list[float | None]
    latency_p50_ms: float | None
    latency_p95_ms: float | None


class Traffic(msgspec.Struct):
    since: float
    bucket_seconds: int
    series: list[TrafficSeries]


#: Rows read for one traffic window at most (newest kept); about 28 requests a second for an hour.
MAX_TRAFFIC_ROWS = 100_000


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of an ascending list, None for an empty one."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return round(sorted_values[rank], 3)


def traffic(db: Database, since: float, now: float, bucket_seconds: int = 60) -> Traffic:
    """Requests, errors, output tokens, tokens/s per bucket and latency percentiles, by provider and model,
    over rows created in ``[since, now]``. Blocks: run it in a thread."""

    def fetch(conn: apsw.Connection) -> list[tuple[float, str, str, str, int, float, float | None]]:
        return [
            (float(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), float(row[5]), row[6])
            for row in conn.execute(
                """SELECT created_at, provider, model, status, tokens_out, latency_ms, ttfb_ms
                   FROM inference_logs WHERE created_at >= ? AND created_at <= ?
                   ORDER BY created_at DESC LIMIT ?""",
                (since, now, MAX_TRAFFIC_ROWS),
            )
        ]

    rows = db.read(fetch)
    count = max(1, int((now - since) // bucket_seconds) + 1)
    grouped: dict[tuple[str, str], list[tuple[float, str, int, float, float | None]]] = {}
    for created, provider, model, status, tokens_out, latency, ttfb in rows:
        grouped.setdefault((provider or "-", model or "-"), []).append((created, status, tokens_out, latency, ttfb))
    series = []
    for (provider, model), items in sorted(grouped.items()):
        requests, errors, tokens = [0] * count, [0] * count, [0] * count
        generated = [0] * count
        seconds = [0.0] * count
        latencies = []
        for created, status, tokens_out, latency, ttfb in items:
            index = min(count - 1, int((created - since) // bucket_seconds))
            requests[index] += 1
            tokens[index] += tokens_out
            if status == "error":
                errors[index] += 1
            if status == "ok":
                latencies.append(latency)
                generating = (latency - (ttfb or 0.0)) / 1000
                if tokens_out > 1 and generating > 0:
                    generated[index] += tokens_out
                    seconds[index] += generating
        latencies.sort()
        rates = [round(g / s, 2) if s > 0 else None for g, s in zip(generated, seconds, strict=True)]
        series.append(
            TrafficSeries(
                provider,
                model,
                requests,
                errors,
                tokens,
                rates,
                percentile(latencies, 0.5),
                percentile(latencies, 0.95),
            )
        )
    return Traffic(since, bucket_seconds, series)
