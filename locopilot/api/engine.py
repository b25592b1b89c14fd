"""Liveness and engine health."""

from __future__ import annotations

import time

import anyio
import msgspec
from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from locopilot.api.responses import GUARDED, answers
from locopilot.api.services import Services
from locopilot.engine.scheduler import RunnerInfo
from locopilot.gateway.ratelimit import LimitStats
from locopilot.schemas.openai import encoder
from locopilot.store import stats


class Liveness(msgspec.Struct):
    status: str = "ok"


class DatabaseHealth(msgspec.Struct):
    ok: bool
    path: str
    error: str | None = None


class EngineHealth(msgspec.Struct):
    ready: bool
    detail: str
    llama_cpp_version: str | None
    devices: list[str]
    loaded_models: list[str]
    runners: list[RunnerInfo]
    models_dir: str


class ProviderHealth(msgspec.Struct):
    """``ttfb_ms``: the smoothed time to first event of recent answers (what ``any`` routing orders by);
    null until measured, or when the last measurement is more than a minute old."""

    name: str
    locality: str
    priority: int
    circuit: str
    consecutive_failures: int
    last_error: str | None
    probe_ms: float | None
    ttfb_ms: float | None
    models: list[str] | None


class Health(msgspec.Struct):
    status: str
    database: DatabaseHealth
    engine: EngineHealth
    providers: list[ProviderHealth]


@get("/health", exclude_from_auth=True, responses=answers(Liveness, 200, 403, 500))
async def health() -> Response[bytes]:
    """Liveness: the process answers. Never needs a key."""
    return Response(encoder.encode(Liveness()), media_type="application/json")


UNREADY = ResponseSpec(Health, generate_examples=False, description="The database or llama.cpp does not work (yet)")


@get("/v1/engine/health", responses={**answers(Health, 200, *GUARDED), 503: UNREADY})
async def engine_health(services: Services) -> Response[bytes]:
    """Readiness: 200 when the database and llama.cpp work, else 503 with what is wrong."""
    db_error = await anyio.to_thread.run_sync(services.db.health)
    engine = services.engine
    ready = db_error is None and engine.ready
    router = services.router
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
        )
        for name, state in router.states.items()
    ]
    body = Health(
        status="ok" if ready else "unavailable",
        database=DatabaseHealth(db_error is None, str(services.db.path), db_error),
        engine=EngineHealth(
            ready=engine.ready,
            detail=engine.detail,
            llama_cpp_version=engine.llama_cpp_version,
            devices=engine.devices,
            loaded_models=services.manager.loaded(),
            runners=services.manager.describe(),
            models_dir=str(services.settings.models_path),
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
async def engine_stats(services: Services) -> Response[bytes]:
    """Requests by provider and model, routing, failovers and errors, since start and over the last hour;
    requests in flight and quota refusals since start."""
    now = time.time()
    since_start = await anyio.to_thread.run_sync(stats.window, services.db, services.started_at)
    last_hour = await anyio.to_thread.run_sync(stats.window, services.db, now - 3600)
    return Response(
        encoder.encode(Stats(since_start, last_hour, services.limiter.stats())), media_type="application/json"
    )


ROUTES = [health, engine_health, engine_stats]
