"""Failover: try a plan's candidates in order until one produces a first event.

A candidate that fails before its first event with an error another provider
might not have (see :func:`may_fail_over`) is marked failed and the next one
is tried; any other error ends the request as it is (a 400 is the request's
fault, and a 401/403 from an explicit remote reaches the client unchanged).
After the first event nothing is retried: two backends are never spliced.

Generations are timed from the start of the attempt to the first event, so a
failed candidate before it does not count against the one that answered; the
router keeps that as the provider's latency (what ``any`` orders by).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from locopilot.errors import LocopilotError, Unavailable, UpstreamError
from locopilot.gateway.router import Plan, Route, Router, Skipped, failover_reason, may_fail_over
from locopilot.gateway.streaming import prime
from locopilot.providers.base import GenerationRequest, StreamEvent

T = TypeVar("T")
MAX_ATTEMPTS = 4


async def first_success(
    router: Router, plan: Plan, attempt: Callable[[Route], Awaitable[T]], *, timed: bool = False
) -> tuple[Route, T]:
    """The first route whose ``attempt`` succeeds, with its result; Unavailable when all fail over.

    ``timed``: the attempt ends at a first event, and its duration is the provider's latency.
    """
    decision = plan.decision
    errors: list[LocopilotError] = []
    routes = plan.routes[:MAX_ATTEMPTS]
    for index, route in enumerate(routes):
        started = router.clock()
        try:
            result = await attempt(route)
        except LocopilotError as exc:
            if not may_fail_over(exc):
                raise
            router.failed(route, exc)
            decision.failed.append(Skipped(route.provider.name, exc.loggable()))
            errors.append(exc)
            if index + 1 < len(routes):
                router.failovers[route.provider.name, failover_reason(exc)] += 1
            continue
        router.succeeded(route, router.clock() - started if timed else None)
        decision.chosen = route.provider.name
        return route, result
    if len(errors) == 1 and not decision.skipped and not isinstance(errors[0], UpstreamError):
        raise errors[0]  # the embedded engine alone: its own 503 says more (queue_full, engine_unavailable)
    reasons = "; ".join(f"{f.provider}: {f.reason}" for f in decision.failed + decision.skipped)
    raise Unavailable(f"every provider for '{decision.requested}' failed ({reasons})", retry_after=5)


async def open_stream(
    router: Router, plan: Plan, request_for: Callable[[str], GenerationRequest]
) -> tuple[Route, StreamEvent, AsyncGenerator[StreamEvent, None]]:
    """The chosen route, its first event and the rest of its stream (the caller closes it)."""

    async def attempt(route: Route) -> tuple[StreamEvent, AsyncGenerator[StreamEvent, None]]:
        events = route.provider.stream(request_for(route.model))
        return await prime(events), events

    route, (first, events) = await first_success(router, plan, attempt, timed=True)
    return route, first, events
