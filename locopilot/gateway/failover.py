"""Failover: try a plan's candidates in order until one produces a first event.

A candidate that fails before its first event with an error another provider
might not have (see :func:`may_fail_over`) is marked failed and the next one
is tried; any other error ends the request as it is (a 400 is the request's
fault, and a 401/403 from an explicit remote reaches the client unchanged).
After the first event nothing is retried: two backends are never spliced.

Generations are timed from the start of the attempt to the first event, so a
failed candidate before it does not count against the one that answered; the
router keeps that as the provider's latency (what ``any`` orders by).

Just before the first attempt the plan's pools are balanced (:meth:`Router.balance`).
A replica at its cap of requests at once is skipped without being sent
anything, and is not counted among the ``MAX_ATTEMPTS``; a request counts as
in flight on a replica from its attempt until its reply ends.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

import anyio

from locopilot.errors import LocopilotError, Unavailable, UpstreamError
from locopilot.gateway.balance import AffinityKind, Lease
from locopilot.gateway.router import Plan, Route, Router, Skipped, failover_reason, may_fail_over
from locopilot.gateway.streaming import prime
from locopilot.providers.base import GenerationRequest, StreamEvent

T = TypeVar("T")
MAX_ATTEMPTS = 4
Affinity = tuple[AffinityKind, bytes]


async def first_success(
    router: Router,
    plan: Plan,
    attempt: Callable[[Route], Awaitable[T]],
    *,
    timed: bool = False,
    affinity: Affinity | None = None,
) -> tuple[Route, T]:
    """The first route whose ``attempt`` succeeds, with its result; Unavailable when all fail over.

    ``timed``: the attempt ends at a first event, and its duration is the provider's latency.
    The request counts as in flight on each route while its ``attempt`` runs.
    """

    async def leased(route: Route, lease: Lease) -> T:
        try:
            return await attempt(route)
        finally:
            lease.release()

    return await _first_success(router, plan, leased, timed=timed, affinity=affinity)


async def _first_success(
    router: Router,
    plan: Plan,
    attempt: Callable[[Route, Lease], Awaitable[T]],
    *,
    timed: bool,
    affinity: Affinity | None,
) -> tuple[Route, T]:
    """:func:`first_success` where ``attempt`` is given the route's lease to release (when it fails, it is
    released here): a stream holds it until it ends."""
    router.balance(plan, affinity)
    decision = plan.decision
    errors: list[LocopilotError] = []
    attempts = 0
    for index, route in enumerate(plan.routes):
        if attempts == MAX_ATTEMPTS:
            break
        lease = router.lease(route)
        if lease is None:
            cap = router.state_of(route).load.cap
            decision.skipped.append(Skipped(route.provider.name, f"at its cap of {cap} requests at once"))
            continue
        attempts += 1
        started = router.clock()
        try:
            result = await attempt(route, lease)
        except LocopilotError as exc:
            lease.release()
            if not may_fail_over(exc):
                raise
            router.failed(route, exc)
            decision.failed.append(Skipped(route.provider.name, exc.loggable()))
            errors.append(exc)
            if index + 1 < len(plan.routes):
                router.failovers[route.provider.name, failover_reason(exc)] += 1
            continue
        except BaseException:
            lease.release()
            raise
        router.succeeded(route, router.clock() - started if timed else None, decision)
        decision.chosen = route.provider.name
        return route, result
    if len(errors) == 1 and not decision.skipped and not isinstance(errors[0], UpstreamError):
        raise errors[0]  # the embedded engine alone: its own 503 says more (queue_full, engine_unavailable)
    reasons = "; ".join(f"{f.provider}: {f.reason}" for f in decision.failed + decision.skipped)
    if not errors:
        raise Unavailable(f"no provider can take a request for '{decision.requested}' now ({reasons})", retry_after=1)
    raise Unavailable(f"every provider for '{decision.requested}' failed ({reasons})", retry_after=5)


async def open_stream(
    router: Router,
    plan: Plan,
    request_for: Callable[[str], GenerationRequest],
    affinity: Affinity | None = None,
) -> tuple[Route, StreamEvent, AsyncGenerator[StreamEvent, None]]:
    """The chosen route, its first event and the rest of its stream (the caller closes it).

    The request counts as in flight on the chosen route until the stream is closed.
    """

    async def attempt(route: Route, lease: Lease) -> tuple[StreamEvent, AsyncGenerator[StreamEvent, None]]:
        events = _held(route.provider.stream(request_for(route.model)), lease)
        return await prime(events), events

    route, (first, events) = await _first_success(router, plan, attempt, timed=True, affinity=affinity)
    return route, first, events


async def _held(events: AsyncGenerator[StreamEvent, None], lease: Lease) -> AsyncGenerator[StreamEvent, None]:
    """``events``, releasing ``lease`` when they end or are closed (primed at once, so closing always ends it)."""
    try:
        async for event in events:
            yield event
    finally:
        lease.release()
        with anyio.CancelScope(shield=True):
            await events.aclose()
