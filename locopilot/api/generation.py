"""The one generation pipeline every API front runs: limit, check, route, stream, record.

A front (OpenAI chat and completions, the Responses API, Anthropic's Messages,
Ollama's chat and generate) translates its body into a
:class:`~locopilot.providers.base.GenerationRequest` and gives a
:class:`~locopilot.gateway.streaming.Formatter` that writes the reply in its own
wire form; routing, failover, quotas, the request log and metrics are this
module's and the same for all of them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from locopilot.api.services import Pipeline
from locopilot.errors import InvalidRequest, ModelNotAllowed
from locopilot.gateway.access import outcome_id
from locopilot.gateway.auth import principal_of
from locopilot.gateway.balance import affinity_key
from locopilot.gateway.failover import first_success, open_stream
from locopilot.gateway.router import PRIVACY_LEVELS, Plan, Route
from locopilot.gateway.streaming import Formatter, OnReply, collect, sse_response, unless_disconnected
from locopilot.gateway.usage import Outcome
from locopilot.providers.base import EmbeddingResult, GenerationRequest, StreamEvent
from locopilot.schemas.openai import encoder
from locopilot.settings import Privacy


def provider_headers(provider: str, model: str) -> dict[str, str]:
    """Where the reply was served; ``X-Request-Id`` is added to every response by the access log."""
    return {"X-Locopilot-Provider": provider, "X-Locopilot-Model": model}


def privacy_of(request: Request[Any, Any, Any], default: Privacy) -> Privacy:
    value = request.headers.get("x-routing-privacy")
    if value is None:
        return default
    for level in PRIVACY_LEVELS:
        if value.strip().lower() == level:
            return level
    raise InvalidRequest(
        f"X-Routing-Privacy must be one of {', '.join(PRIVACY_LEVELS)}, not {value!r}", param="X-Routing-Privacy"
    )


async def route_for(pipeline: Pipeline, request: Request[Any, Any, Any], model: str, policy: Privacy) -> Plan:
    """The router's plan for ``model`` under ``policy`` and the request principal's constraints (its privacy
    pin and model allowlist); a model the allowlist refuses goes to the audit trail. Raises as
    :meth:`~locopilot.gateway.router.Router.plan` does."""
    try:
        return await pipeline.router.plan(model, policy, principal_of(request).constraints)
    except ModelNotAllowed as exc:
        pipeline.auth.refused_model(request, exc, model)
        raise


async def serve_generation(
    pipeline: Pipeline,
    request: Request[Any, Any, Any],
    *,
    endpoint: str,
    id_prefix: str,
    model: str,
    stream: bool,
    build: Callable[[], GenerationRequest],
    formatter: Callable[[str], Formatter],
    on_reply: OnReply | None = None,
    session: str | None = None,
) -> Response[bytes] | Stream:
    """Limit, check, route (with failover before the first byte), generate and record one reply.

    ``build`` translates and checks the body (raising InvalidRequest) once the request
    is admitted; ``formatter`` makes the reply's wire form from the request id
    (``id_prefix`` + a unique part). ``endpoint`` names the API in the request log and
    metrics. ``on_reply`` sees the whole reply before its last bytes go out. ``session`` is the body's
    own session id (OpenAI's ``user``), which keeps a conversation on one replica of a pool unless an
    ``X-Session-Id`` header names another.
    """
    request_id = outcome_id(request.scope, id_prefix)
    principal = principal_of(request)
    outcome = Outcome(request_id, endpoint, model, key_id=principal.key_id)
    async with pipeline.recorder.recording(outcome):
        admission = outcome.admission = pipeline.limiter.admit(principal)
        generation = build()
        if pipeline.settings.log_prompts:
            outcome.keep_text(generation.messages if generation.messages is not None else generation.prompt)
        policy = privacy_of(request, pipeline.settings.routing_privacy)
        plan = await route_for(pipeline, request, model, policy)
        outcome.routing = plan.decision
        wire = formatter(request_id)
        affinity = affinity_key(
            generation, request.headers.get("x-session-id") or session, pipeline.settings.routing_affinity
        )

        def request_for(routed: str) -> GenerationRequest:
            return msgspec.structs.replace(generation, model=routed)

        async def opened() -> tuple[Route, StreamEvent, AsyncGenerator[StreamEvent, None]]:
            route, first, events = await open_stream(pipeline.router, plan, request_for, affinity)
            outcome.model, outcome.provider = route.model, route.provider.name
            outcome.ttfb = pipeline.recorder.clock() - outcome.started
            return route, first, events

        if not stream:

            async def whole() -> tuple[Route, msgspec.Struct]:
                route, first, events = await opened()
                return route, await collect(first, events, wire, outcome, pipeline.recorder, on_reply)

            route, reply = await unless_disconnected(request.receive, whole, pipeline.shutdown)
            headers = {**provider_headers(route.provider.name, route.model), **admission.headers()}
            return Response(encoder.encode(reply), media_type="application/json", headers=headers)
        route, first, events = await unless_disconnected(request.receive, opened, pipeline.shutdown)
        return sse_response(
            first,
            events,
            wire,
            outcome=outcome,
            recorder=pipeline.recorder,
            headers={**provider_headers(route.provider.name, route.model), **admission.headers()},
            shutdown=pipeline.shutdown,
            on_reply=on_reply,
        )


async def serve_embedding(
    pipeline: Pipeline,
    request: Request[Any, Any, Any],
    *,
    endpoint: str,
    id_prefix: str,
    model: str,
    inputs: Callable[[], list[str]],
) -> tuple[Route, EmbeddingResult, dict[str, str]]:
    """Limit, check, route (with failover) and record one embedding request, for every front.

    ``inputs`` checks the body and gives the texts (raising InvalidRequest) once the request is
    admitted. Returns where it was served, the vectors and the response headers to send.
    """
    request_id = outcome_id(request.scope, id_prefix)
    principal = principal_of(request)
    outcome = Outcome(request_id, endpoint, model, key_id=principal.key_id)
    async with pipeline.recorder.recording(outcome):
        admission = outcome.admission = pipeline.limiter.admit(principal)
        texts = inputs()
        if pipeline.settings.log_prompts:
            outcome.keep_text(texts, reply=False)
        policy = privacy_of(request, pipeline.settings.routing_privacy)
        plan = await route_for(pipeline, request, model, policy)
        outcome.routing = plan.decision

        async def attempt(route: Route) -> EmbeddingResult:
            return await route.provider.embed(route.model, texts)

        route, result = await unless_disconnected(
            request.receive, lambda: first_success(pipeline.router, plan, attempt), pipeline.shutdown
        )
        outcome.model, outcome.provider = route.model, route.provider.name
    outcome.tokens_in = result.prompt_tokens
    await pipeline.recorder.settle(outcome)
    return route, result, {**provider_headers(route.provider.name, route.model), **admission.headers()}
