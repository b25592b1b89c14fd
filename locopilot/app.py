"""create_app(settings): the Litestar application, its lifespan and error handling."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import msgspec
from anyio.abc import TaskGroup
from litestar import Litestar, MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin

from locopilot import __version__, children
from locopilot.api import admin as admin_api
from locopilot.api import anthropic as anthropic_api
from locopilot.api import console as console_api
from locopilot.api import engine as engine_api
from locopilot.api import files as files_api
from locopilot.api import hosts as hosts_api
from locopilot.api import models as models_api
from locopilot.api import ollama as ollama_api
from locopilot.api import ollama_models as ollama_models_api
from locopilot.api import openai as openai_api
from locopilot.api import openai_responses as responses_api
from locopilot.api import training as training_api
from locopilot.api.services import EngineStatus, Services, dependencies
from locopilot.engine.protocol import probe_decoder
from locopilot.engine.supervisor import ModelManager, probe_command
from locopilot.errors import (
    InvalidRequest,
    LocopilotError,
    NotFound,
    UpstreamError,
    error_for_status,
    front_of,
    render,
)
from locopilot.gateway.access import AccessLog, outcome_id
from locopilot.gateway.auth import DOCS_PATH, Authenticator, principal_of
from locopilot.gateway.balance import Load
from locopilot.gateway.guard import GuardMiddleware
from locopilot.gateway.hygiene import HostCheck, cors_config
from locopilot.gateway.metrics import Metrics
from locopilot.gateway.ratelimit import RateLimiter
from locopilot.gateway.router import ProviderState, Router
from locopilot.gateway.shutdown import Shutdown, on_signal
from locopilot.gateway.usage import Outcome, UsageRecorder
from locopilot.models.catalog import ModelCatalog
from locopilot.models.pull import Puller
from locopilot.providers.base import Provider
from locopilot.providers.embedded import EmbeddedProvider
from locopilot.providers.http import upstream_transport
from locopilot.providers.ollama import OllamaProvider
from locopilot.providers.openai_compat import OpenAICompatProvider
from locopilot.settings import Settings, SettingsError, UpstreamConfig
from locopilot.settings import reload_upstreams as read_upstreams
from locopilot.store import responses as stored_responses
from locopilot.store.db import Database, StoreError
from locopilot.store.upkeep import fail_interrupted_jobs, purge_older_than
from locopilot.training.jobs import JobService, resumable_jobs

log = logging.getLogger("locopilot")

PROBE_TIMEOUT = 120
RETENTION_INTERVAL = 3600.0


def error_response(exc: LocopilotError, path: str = "") -> Response[bytes]:
    """``exc`` in the error shape of the API that ``path`` belongs to (:func:`locopilot.errors.render`)."""
    status, body = render(exc, front_of(path))
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=exc.headers())


# Requests to these are logged even when refused before their handler runs.
INFERENCE_ENDPOINTS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "messages.count_tokens",
    "/api/chat": "ollama.chat",
    "/api/generate": "ollama.generate",
    "/api/embed": "ollama.embed",
    "/api/embeddings": "ollama.embeddings",
}


def rejected(request: Request[Any, Any, Any], exc: LocopilotError) -> Response[bytes]:
    """The error response for a request refused before its handler ran; inference requests are logged."""
    endpoint = INFERENCE_ENDPOINTS.get(request.url.path)
    services: Services | None = getattr(request.app.state, "services", None)
    if endpoint is not None and services is not None:
        outcome = Outcome(outcome_id(request.scope, "req"), endpoint, model="", key_id=principal_of(request).key_id)
        services.recorder.finish(outcome, error=exc)
    return error_response(exc, request.url.path)


PASSED_THROUGH = (401, 403)


def handle_locopilot_error(request: Request[Any, Any, Any], exc: LocopilotError) -> Response[bytes]:
    if isinstance(exc, UpstreamError) and exc.upstream_status in PASSED_THROUGH and exc.upstream_body is not None:
        # An upstream's refusal (a key it rejects, a plan it requires, with its upgrade_url)
        # is the client's to read as the upstream wrote it.
        return Response(exc.upstream_body, status_code=exc.upstream_status, media_type=MediaType.JSON)
    return error_response(exc, request.url.path)


def handle_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    problems = exc.extra if isinstance(exc.extra, list) else []
    first = problems[0] if problems and isinstance(problems[0], dict) else {}
    key = str(first.get("key") or "")
    if key == "data":  # Litestar's name for the whole body
        key = ""
    message = str(first.get("message") or exc.detail)
    text = f"Invalid value for '{key}': {message}" if key else f"Invalid request body: {message}"
    return rejected(request, InvalidRequest(text, param=key or None))


def handle_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if exc.status_code == 400:
        # Litestar raises a plain 400 when the body is not JSON at all.
        return rejected(request, InvalidRequest(f"The request body could not be read: {exc.detail}"))
    return rejected(request, error_for_status(exc.status_code, exc.detail))


async def json_not_found(response: Response[Any]) -> Response[Any]:
    """Our 404 for Litestar's HTML one.

    Litestar's OpenAPI router answers a path under ``/openapi`` that names no viewer
    (``/openapi/anything``) from a handler of its own that returns an HTML page, so no
    exception handler sees it; no handler of ours answers HTML.

    A coroutine function on purpose: Litestar runs a plain function given as ``after_request``
    in a worker thread, a hand-off to another thread and back on every response.
    """
    if response.status_code == 404 and response.media_type == MediaType.HTML:
        return error_response(NotFound("Not Found"))
    return response


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(LocopilotError("Internal server error."), request.url.path)


async def retain_logs(db: Database, days: int, response_days: int = 0) -> None:
    """Delete request-log and audit rows older than ``days`` days, and stored responses older than
    ``response_days`` days, now and every hour; 0 keeps them."""
    if days <= 0 and response_days <= 0:
        return
    while True:
        try:
            deleted = await db.call(purge_older_than, days)
            if response_days > 0:
                cutoff = time.time() - response_days * 86400
                purged = await db.call(stored_responses.purge_before, cutoff)
                if purged:
                    log.info("deleted %d stored responses older than %d days", purged, response_days)
        except StoreError as exc:
            log.warning("could not delete old rows: %s", exc)
        else:
            if deleted:
                log.info("deleted %d log rows older than %d days", deleted, days)
        await anyio.sleep(RETENTION_INTERVAL)


async def probe_engine(status: EngineStatus, settings: Settings) -> None:
    """Check, in a child process, that llama.cpp loads and finds a backend."""
    try:
        with anyio.fail_after(PROBE_TIMEOUT):
            result = await anyio.run_process(
                probe_command(settings.backends_dir),
                check=False,
                cwd=settings.data_path,
                env=children.environment(),
            )
    except (TimeoutError, OSError) as exc:
        status.detail = f"llama.cpp probe failed: {exc}"
        return
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        status.detail = f"llama.cpp does not load (exit code {result.returncode}): {tail[0]}"
        return
    try:
        found = probe_decoder.decode(result.stdout)
    except msgspec.DecodeError as exc:
        status.detail = f"llama.cpp probe answered something unexpected: {exc}"
        return
    status.llama_cpp_version = found.version
    status.devices = found.devices
    status.cpu = found.cpu
    status.gpus = found.gpus
    status.gpu_note = found.gpu_note
    status.ready = True
    status.detail = "ready"


def upstream_timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(settings.upstream_timeout, connect=min(5.0, settings.upstream_timeout))


PROVIDER_KINDS: dict[str, Callable[[UpstreamConfig, Settings], Provider]] = {
    "openai": lambda config, settings: OpenAICompatProvider(
        config.name,
        config.url,
        api_key=config.api_key,
        locality=config.locality,
        timeout=upstream_timeout(settings),
        transport=upstream_transport(settings.upstream_transport),
    ),
    "ollama": lambda config, settings: OllamaProvider(
        config.name,
        config.url,
        num_ctx=settings.ctx_size or 4096,
        locality=config.locality,
        timeout=upstream_timeout(settings),
        transport=upstream_transport(settings.upstream_transport),
    ),
}


def upstream_state(config: UpstreamConfig, settings: Settings) -> ProviderState:
    return ProviderState(
        PROVIDER_KINDS[config.kind](config, settings),
        config.priority,
        config.models,
        config=config,
        load=Load(weight=config.weight, cap=config.max_concurrent),
    )


def upstream_states(settings: Settings) -> list[ProviderState]:
    return [upstream_state(c, settings) for c in settings.upstream_configs]


RELOAD_SIGNAL = signal.SIGHUP
"""Reloads the upstream settings; granian's main process passes it on to the worker (see locopilot.server)."""


def listen_for_reload(reload: Callable[[], None]) -> None:
    """Call ``reload`` on :data:`RELOAD_SIGNAL` (see :func:`locopilot.gateway.shutdown.on_signal`)."""
    on_signal(RELOAD_SIGNAL, reload)


def reload_upstreams(settings: Settings, router: Router, tasks: TaskGroup) -> None:
    """On SIGHUP: read the upstream settings again (``LOCOPILOT_UPSTREAMS_FILE``) and route by them from now on;
    requests in flight finish where they are, then a removed upstream's client is closed. A bad file is logged
    and changes nothing."""
    try:
        configs = read_upstreams(settings)
    except SettingsError as exc:
        log.error("upstreams not reloaded: %s", exc)
        return
    retired = router.reconfigure(configs, lambda config: upstream_state(config, settings))
    for state in retired:
        tasks.start_soon(router.retire, state, settings.upstream_timeout + settings.shutdown_grace)
    log.info(
        "upstreams reloaded: %s", ", ".join(c.name for c in configs) or "none", extra={"event": "upstreams_reloaded"}
    )


async def announce_access(authenticator: Authenticator) -> None:
    """Say at startup whether requests need an API key."""
    settings = authenticator.settings
    if await authenticator.is_open():
        log.warning(
            "no API key is configured: serving %s:%d WITHOUT AUTHENTICATION (loopback only); "
            "create a key with `locopilot keys create NAME` to require one",
            settings.host,
            settings.port,
        )
    else:
        log.info("API keys are required on every route but GET /health")


def create_app(settings: Settings) -> Litestar:
    """The application; nothing starts until its lifespan runs."""
    host_check = HostCheck(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        db = await anyio.to_thread.run_sync(Database.open, settings.db_path)
        try:
            resumable = await anyio.to_thread.run_sync(resumable_jobs, settings)
            if interrupted := await db.call(fail_interrupted_jobs, time.time(), resumable):
                log.warning("%d training jobs were running when the server last stopped; marked failed", interrupted)
            catalog = ModelCatalog(settings.models_path)
            async with anyio.create_task_group() as tasks:
                manager = ModelManager(settings, catalog.load_path, tasks)
                embedded = EmbeddedProvider(manager, catalog, settings.queue_size)
                router = Router(
                    [ProviderState(embedded, 0, local_engine=True), *upstream_states(settings)],
                    settings.default_model,
                    breaker_cooldown=settings.breaker_cooldown,
                    aliases=settings.model_alias_pairs,
                    affinity_load_factor=settings.affinity_load_factor,
                )
                engine = EngineStatus()
                shutdown = Shutdown(settings.shutdown_grace)
                shutdown.listen()
                authenticator = Authenticator(settings, db)
                await announce_access(authenticator)
                if settings.log_prompts:
                    log.warning(
                        "LOCOPILOT_LOG_PROMPTS is on: every inference request's messages and its completion "
                        "are stored in the request log in %s",
                        settings.db_path,
                    )
                limiter = RateLimiter(settings.max_concurrent_requests, settings.default_rpm, settings.default_tpm)
                metrics = Metrics(router, manager, limiter, db, lambda: engine.ready)
                training = JobService(settings, db, catalog)
                app.state.services = Services(
                    settings=settings,
                    db=db,
                    catalog=catalog,
                    manager=manager,
                    router=router,
                    recorder=UsageRecorder(db, metrics.requests),
                    engine=engine,
                    auth=authenticator,
                    limiter=limiter,
                    metrics=metrics,
                    shutdown=shutdown,
                    training=training,
                    puller=Puller(settings, catalog, db, tasks),
                    hosts=host_check,
                )
                tasks.start_soon(probe_engine, engine, settings)
                tasks.start_soon(manager.reap_idle)
                tasks.start_soon(retain_logs, db, settings.log_retention_days, settings.responses_retention_days)
                tasks.start_soon(shutdown.watch_parent)
                await tasks.start(training.run)
                if len(router.states) > 1 or settings.upstreams_file:
                    tasks.start_soon(router.probe_forever, settings.probe_interval)
                listen_for_reload(lambda: reload_upstreams(settings, router, tasks))
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        await training.aclose()
                        await router.aclose()
                    tasks.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(db.close)
            # The last connection to close checkpoints the WAL into the database and deletes it.
            wal = db.path.with_name(db.path.name + "-wal")
            left = wal.stat().st_size if wal.exists() else 0
            log.info("stopped: database closed, %d bytes left in its WAL", left, extra={"event": "stopped"})

    app = Litestar(
        route_handlers=[
            *openai_api.ROUTES,
            *responses_api.ROUTES,
            *anthropic_api.ROUTES,
            *ollama_api.ROUTES,
            *ollama_models_api.ROUTES,
            *engine_api.ROUTES,
            *admin_api.ROUTES,
            *hosts_api.ROUTES,
            *files_api.ROUTES,
            *training_api.ROUTES,
            *models_api.ROUTES,
            *console_api.ROUTES,
        ],
        # Host check, then auth, then body screening (locopilot.gateway.guard).
        middleware=[GuardMiddleware(host_check)],
        cors_config=cors_config(settings),
        lifespan=[lifespan],
        # Handlers take services by name (db, router, pipeline...) from what the lifespan put in the state.
        dependencies=dependencies(lambda: app.state.services),
        exception_handlers={
            LocopilotError: handle_locopilot_error,
            ValidationException: handle_validation_error,
            HTTPException: handle_http_error,
            Exception: handle_unexpected,
        },
        request_max_body_size=settings.max_body_bytes,
        after_request=json_not_found,
        # The schema only (JSON at /openapi and /openapi/openapi.json, and YAML): Litestar's viewer
        # pages load their scripts from public CDNs, blank on an air-gapped machine and a request
        # to another host from every other; the web console's API page shows the schema instead.
        openapi_config=OpenAPIConfig(
            title="locopilot",
            version=__version__,
            path=DOCS_PATH,
            render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
        ),
        logging_config=None,
        debug=False,
    )
    # Outermost, where Litestar puts CORS: its own middleware never sees a 404 or a 405.
    app.asgi_handler = AccessLog(app.asgi_handler)
    return app
