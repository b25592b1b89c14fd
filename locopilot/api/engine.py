"""Liveness and engine health."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec

from locopilot.api.responses import GUARDED, answers
from locopilot.api.services import EngineStatus
from locopilot.engine.protocol import CpuBackend, GpuDevice
from locopilot.engine.supervisor import ModelManager, RunnerInfo
from locopilot.gateway.metrics import Metrics
from locopilot.gateway.ratelimit import LimitStats, RateLimiter
from locopilot.gateway.router import Router
from locopilot.gateway.shutdown import Shutdown
from locopilot.schemas.openai import encoder
from locopilot.settings import Settings
from locopilot.store import stats
from locopilot.store.db import Database


class Liveness(msgspec.Struct):
    status: str = "ok"
    detail: str | msgspec.UnsetType = msgspec.UNSET
    """Why not ``ok``: a stop has begun (the answer is then 503)."""


class DatabaseHealth(msgspec.Struct):
    ok: bool
    path: str
    error: str | None = None


class EngineHealth(msgspec.Struct):
    """``cpu``: the CPU library llama.cpp chose for this machine (null until the probe ends well).
    ``gpus``: the GPUs a companion library found, with their memory as the probe saw it (each
    runner's ``gpu_layers`` and ``offload`` say what its model got); ``gpu_note``: why a companion
    that was there gave no GPU ("" otherwise)."""

    ready: bool
    detail: str
    llama_cpp_version: str | None
    devices: list[str]
    cpu: CpuBackend | None
    loaded_models: list[str]
    runners: list[RunnerInfo]
    models_dir: str
    gpus: list[GpuDevice] = msgspec.field(default_factory=list)
    gpu_note: str = ""


class ProviderHealth(msgspec.Struct):
    """``ttfb_ms``: the smoothed time to first event of recent answers (what ``any`` routing orders by);
    null until measured, or when the last measurement is more than a minute old. A provider is one
    replica when several serve a model at one priority (a pool)."""

    name: str
    locality: str
    priority: int
    circuit: str
    consecutive_failures: int
    last_error: str | None
    probe_ms: float | None
    ttfb_ms: float | None
    models: list[str] | None
    in_flight: int = 0
    """Requests it is serving now (from the attempt to the end of the reply)."""
    weight: float = 1.0
    """Its share of a pool of replicas that serve the same model at the same priority."""
    max_concurrent: int | None = None
    """Its cap on requests at once; null when it has none."""


class Health(msgspec.Struct):
    status: str
    database: DatabaseHealth
    engine: EngineHealth
    providers: list[ProviderHealth]


DRAINING = ResponseSpec(Liveness, generate_examples=False, description="A stop has begun")


@get("/health", exclude_from_auth=True, responses={**answers(Liveness, 200, 403, 500), 503: DRAINING})
async def health(shutdown: Shutdown) -> Response[bytes]:
    """Liveness: the process answers, 503 once it is shutting down. Never needs a key."""
    if shutdown.draining:
        body = Liveness("shutting_down", f"shutting down: {shutdown.reason}")
        return Response(encoder.encode(body), media_type="application/json", status_code=503)
    return Response(encoder.encode(Liveness()), media_type="application/json")


UNREADY = ResponseSpec(Health, generate_examples=False, description="The database or llama.cpp does not work (yet)")


@get("/v1/engine/health", responses={**answers(Health, 200, *GUARDED), 503: UNREADY})
async def engine_health(
    db: Database,
    engine: EngineStatus,
    shutdown: Shutdown,
    router: Router,
    manager: ModelManager,
    settings: Settings,
) -> Response[bytes]:
    """Readiness: 200 when the database and llama.cpp work, else 503 with what is wrong."""
    db_error = await db.call(Database.health)
    ready = db_error is None and engine.ready and not shutdown.draining
    providers = [
        ProviderHealth(
            name=name,
            locality=state.provider.locality,
            priority=state.priority,
            circuit=state.breaker.state(router.clock()),
            consecutive_failures=state.breaker.failures,
            last_error=state.last_error,
            probe_ms=None if state.probe_ms is None else round(state.probe_ms, 3),
            ttfb_ms=None if (ttfb := state.latency.fresh(router.clock())) is None else round(ttfb, 3),
            models=list(state.configured_models) or state.models,
            in_flight=state.load.in_flight,
            weight=state.load.weight,
            max_concurrent=state.load.cap or None,
        )
        for name, state in router.states.items()
    ]
    body = Health(
        status="ok" if ready else "shutting_down" if shutdown.draining else "unavailable",
        database=DatabaseHealth(db_error is None, str(db.path), db_error),
        engine=EngineHealth(
            ready=engine.ready,
            detail=engine.detail,
            llama_cpp_version=engine.llama_cpp_version,
            devices=engine.devices,
            cpu=engine.cpu,
            loaded_models=manager.loaded(),
            runners=manager.describe(),
            models_dir=str(settings.models_path),
            gpus=engine.gpus,
            gpu_note=engine.gpu_note,
        ),
        providers=providers,
    )
    return Response(encoder.encode(body), media_type="application/json", status_code=200 if ready else 503)


class Stats(msgspec.Struct):
    since_start: stats.WindowStats
    last_hour: stats.WindowStats
    limits: LimitStats
    """Requests in flight and quota refusals since start (this process's counters)."""


@get("/v1/engine/stats", responses=answers(Stats, 200, *GUARDED))
async def engine_stats(db: Database, limiter: RateLimiter, started_at: float) -> Response[bytes]:
    """Requests by provider and model, routing, failovers and errors, since start and over the last hour;
    requests in flight and quota refusals since start."""
    now = time.time()
    since_start = await db.call(stats.window, started_at)
    last_hour = await db.call(stats.window, now - 3600)
    return Response(encoder.encode(Stats(since_start, last_hour, limiter.stats())), media_type="application/json")


EXPOSITION = ResponseSpec(
    str, media_type="text/plain", generate_examples=False, description="Prometheus text (OpenMetrics if asked for)"
)


@get("/metrics", responses={**answers(str, 200, *GUARDED), 200: EXPOSITION})
async def metrics(metrics: Metrics, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus metrics (text format, or OpenMetrics when the scraper asks for it). Admin scope,
    or no key with LOCOPILOT_METRICS_PUBLIC."""
    # Collected on the event loop: the collectors read state the loop changes, and read nothing slow
    # (process and runner memory come from small /proc files).
    body, content_type = metrics.exposition(request.headers.get("accept", ""))
    # As a header, not media_type: Litestar appends a second charset to a text/ media type.
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


ROUTES = [health, engine_health, engine_stats, metrics]
