"""Routing: a request's model name and privacy policy → an ordered list of candidates.

1. A name ``LOCOPILOT_MODEL_ALIASES`` maps (exactly, or by a glob) is replaced by its
   model, for every API front alike (:meth:`Router.resolve`); then ``default`` names
   ``LOCOPILOT_DEFAULT_MODEL``.
2. ``name:model`` or ``name/model``, where ``name`` is a configured provider
   (split on the first separator, since Ollama tags contain ``:``), goes to
   that provider only. ``auto`` is the first provider that can serve anything.
3. Otherwise every provider that serves the model (``name`` and ``name:latest`` are one
   model, see :func:`served_name`) is a candidate, in priority
   order (lower first); ``local_preferred`` puts local providers first,
   ``local_only`` drops remote ones entirely.
   A request's principal (its API key) brings :class:`Constraints`: its privacy pin
   replaces a looser requested policy (a header cannot loosen it), and its model
   allowlist (:func:`allows`) keeps only the candidates it admits.
4. A provider whose circuit breaker is open is skipped, with the reason kept
   for the 503 and the request log.
5. ``any`` then puts the fastest first (:meth:`Router.fastest_first`): the
   candidates with a fresh measured latency (see :class:`Latency`) in order of
   it, lower first. A candidate with no measurement from the last
   ``LATENCY_TTL`` seconds is *due* one and goes before them all, in priority
   order, so that it gets measured: a provider never measured, or measured
   slow once (a model loading, a busy moment), is tried again within a
   minute instead of never. Only one request per ``LATENCY_TRIAL_GAP`` is sent
   to a due provider to measure it; while that one is under way the provider
   waits behind the measured ones, so a burst does not all go to the slow one.
   Ties keep priority order. The decision records the latencies it used.
6. Candidates of one priority and locality are a *pool* of replicas of the model
   (:meth:`Router.balance`, when the request is tried): the least busy goes first,
   or the one that has the conversation's prompt cache (see
   :mod:`locopilot.gateway.balance`); the others follow as failover, least busy
   first. Under ``any`` a pool moves as one, by its fastest member's latency.

The router also keeps each provider's health: a breaker fed by request
outcomes and by the active probe (:meth:`Router.probe_forever`), the last
error and the latency of the last probe, the smoothed time to first event of
its answers, and a short-lived cache of the models each provider serves.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import msgspec

from locopilot.errors import (
    LocopilotError,
    ModelNotAllowed,
    ModelNotFound,
    PolicyForbidden,
    QueueFull,
    Unavailable,
    UpstreamError,
)
from locopilot.gateway.balance import AffinityKind, Lease, Load, choose
from locopilot.providers.base import Provider
from locopilot.settings import Privacy, UpstreamConfig

log = logging.getLogger(__name__)

PRIVACY_LEVELS: tuple[Privacy, ...] = ("local_only", "local_preferred", "any")
BREAKER_THRESHOLD = 3
BREAKER_COOLDOWN = 30.0
MODELS_TTL = 30.0
PROBE_INTERVAL = 15.0
PROBE_TIMEOUT = 5.0
LATENCY_WEIGHT = 0.3
LATENCY_TTL = 60.0
LATENCY_TRIAL_GAP = 10.0


def split_model(name: str, providers: Iterable[str]) -> tuple[str | None, str]:
    """``(provider, model)``: a ``provider:`` or ``provider/`` prefix names a provider only when one of
    that name is configured (split on the first separator, so Ollama tags like ``llama3.2:1b`` stay
    whole) and a model follows it; otherwise ``(None, name)``."""
    cut = min((i for i in (name.find(":"), name.find("/")) if i > 0), default=-1)
    if cut > 0 and name[:cut] in providers and name[cut + 1 :]:
        return name[:cut], name[cut + 1 :]
    return None, name


def allows(entries: tuple[str, ...] | None, providers: Iterable[str], provider: str, model: str) -> bool:
    """Whether an allowlist admits ``model`` served by ``provider``.

    Entries read like request model names (:func:`split_model`): ``provider:model`` (or
    ``provider/model``) admits that model from that provider only, ``provider:*`` every model of
    that provider, and any other entry that model name from any provider. None admits everything.
    """
    if entries is None:
        return True
    providers = frozenset(providers)
    for entry in entries:
        named, entry_model = split_model(entry, providers)
        if named is None:
            if entry == model:
                return True
        elif named == provider and entry_model in ("*", model):
            return True
    return False


def stricter(requested: Privacy, pinned: Privacy | None) -> Privacy:
    """The stricter of two policies: a pinned key's requests are never looser than its pin."""
    if pinned is None:
        return requested
    return min(requested, pinned, key=PRIVACY_LEVELS.index)


@dataclass(frozen=True)
class Constraints:
    """What a request's principal may route to: a privacy pin and a model allowlist (None: no limit)."""

    privacy: Privacy | None = None
    models: tuple[str, ...] | None = None


UNCONSTRAINED = Constraints()


@dataclass
class Breaker:
    """Opens after ``threshold`` failures in a row; after ``cooldown`` one trial request may pass."""

    threshold: int = BREAKER_THRESHOLD
    cooldown: float = BREAKER_COOLDOWN
    failures: int = 0
    opened_at: float | None = None

    def state(self, now: float) -> Literal["closed", "open", "half_open"]:
        if self.opened_at is None:
            return "closed"
        return "half_open" if now - self.opened_at >= self.cooldown else "open"

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = now


@dataclass
class Latency:
    """A provider's time to first event, smoothed over its successful requests (an EWMA).

    One number per provider, over all its models and prompts: a provider that
    serves a large and a small model gets one average of both. A measurement
    older than ``LATENCY_TTL`` is stale: the next sample starts the average
    over rather than blending into what the provider was like a minute ago.
    """

    ms: float | None = None
    measured_at: float = -math.inf
    trial_at: float = -math.inf
    """When a request was last sent to this provider first to measure it."""

    def fresh(self, now: float) -> float | None:
        """The smoothed latency in milliseconds, or None if there is none from the last LATENCY_TTL."""
        return self.ms if self.ms is not None and now - self.measured_at < LATENCY_TTL else None

    def due(self, now: float) -> bool:
        """Whether the next request should measure this provider: no fresh latency and no trial under way."""
        return self.fresh(now) is None and now - self.trial_at >= LATENCY_TRIAL_GAP

    def add(self, ms: float, now: float) -> None:
        previous = self.fresh(now)
        self.ms = ms if previous is None else previous + LATENCY_WEIGHT * (ms - previous)
        self.measured_at = now


@dataclass
class ProviderState:
    """A provider and what the router knows of it.

    ``local_engine`` marks locopilot's own engine: it is asked for its models
    every time (it keeps its folder's listing until the folder changes), is not
    probed, and keeps its health per model itself, so no breaker trips on it.
    """

    provider: Provider
    priority: int
    configured_models: tuple[str, ...] = ()
    local_engine: bool = False
    config: UpstreamConfig | None = None
    """The settings it was made from (an upstream's); a reload replaces it when they change."""
    breaker: Breaker = field(default_factory=Breaker)
    models: list[str] | None = None
    models_at: float = -1e9
    last_error: str | None = None
    probe_ms: float | None = None
    latency: Latency = field(default_factory=Latency)
    load: Load = field(default_factory=Load)
    """Its weight in a pool, its cap on requests at once and its requests in flight."""


@dataclass(frozen=True)
class Route:
    provider: Provider
    model: str


class Skipped(msgspec.Struct, frozen=True):
    provider: str
    reason: str


class Decision(msgspec.Struct, kw_only=True):
    """What routing decided, as stored with the request's log row.

    ``order`` says how ``candidates`` were ordered: ``priority``, or under
    ``any`` ``latency``, with the fresh smoothed time to first event of each
    candidate that had one (``latency_ms``) and the candidates put first
    because they were due a measurement (``measuring``).
    """

    policy: Privacy
    requested: str
    alias_of: str | None = None
    """The name the request sent, when LOCOPILOT_MODEL_ALIASES mapped it to ``requested``."""
    explicit: bool = False
    candidates: list[str] = []
    skipped: list[Skipped] = []
    failed: list[Skipped] = []
    chosen: str | None = None
    order: Literal["priority", "latency"] = "priority"
    latency_ms: dict[str, float] = {}
    measuring: list[str] = []
    pool: list[str] = []
    """The replicas of the first pool of more than one (see :meth:`Router.balance`), in the order tried."""
    in_flight: dict[str, int] = {}
    """Their requests in flight when this one was balanced."""
    affinity: AffinityKind | None = None
    """What kept the request with a replica: a ``session`` id or the ``prefix`` fingerprint."""
    affinity_to: str | None = None
    """The replica the affinity key ranks first; ``chosen`` differs from it when the request spilled."""


@dataclass
class Plan:
    routes: list[Route]
    decision: Decision


class Router:
    def __init__(
        self,
        providers: list[ProviderState],
        default_model: str,
        *,
        breaker_cooldown: float = BREAKER_COOLDOWN,
        aliases: tuple[tuple[str, str], ...] = (),
        affinity_load_factor: float = 1.25,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.aliases = aliases
        self.breaker_cooldown = breaker_cooldown
        self.affinity_load_factor = affinity_load_factor
        self.rng = rng or random.Random()
        for state in providers:
            state.breaker.cooldown = breaker_cooldown
        self.states = {state.provider.name: state for state in providers}
        self.retired: dict[int, ProviderState] = {}
        """Upstreams a reload removed or replaced, by ``id`` of their provider, until their requests in flight
        end (see :meth:`reconfigure`)."""
        self.default_model = default_model
        self.clock = clock
        self.failovers: Counter[tuple[str, str]] = Counter()
        """Since start, by (provider that failed, :func:`failover_reason`): requests moved on to the next candidate."""
        self.affinity_routes: Counter[tuple[str, str]] = Counter()
        """Since start, by (replica that served, ``hit`` or ``spill``): requests with an affinity key served by a
        pool's replica, the one the key ranks first (a hit) or another (a spill)."""

    def state_of(self, route: Route) -> ProviderState:
        """``route``'s provider state, also for a route planned just before a reload retired it."""
        state = self.states.get(route.provider.name)
        if state is not None and state.provider is route.provider:
            return state
        # Retired, or closed already (planned just before): a state of its own, for the attempt to fail over.
        return self.retired.get(id(route.provider)) or ProviderState(route.provider, 0)

    def reconfigure(
        self, configs: tuple[UpstreamConfig, ...], build: Callable[[UpstreamConfig], ProviderState]
    ) -> list[ProviderState]:
        """Make the upstreams ``configs``: keep those whose settings did not change (with their health, latency
        and requests in flight), ``build`` the new and changed ones, and retire the rest. The local engine
        stays. Returns the retired states: the caller closes each with :meth:`retire`."""
        wanted = {config.name: config for config in configs}
        retired = []
        for name, state in list(self.states.items()):
            if not state.local_engine and state.config != wanted.get(name):
                retired.append(self.states.pop(name))
                self.retired[id(state.provider)] = state
        for config in configs:
            if config.name not in self.states:
                state = build(config)
                state.breaker.cooldown = self.breaker_cooldown
                self.states[config.name] = state
        return retired

    async def retire(self, state: ProviderState, grace: float) -> None:
        """Close a retired upstream's client once its requests in flight have ended (or after ``grace``)."""
        with anyio.move_on_after(grace):
            while state.load.in_flight:  # noqa: ASYNC110 (leases end in sync code; a poll beats an Event per lease)
                await anyio.sleep(0.1)
        self.retired.pop(id(state.provider), None)
        await state.provider.aclose()

    def ordered(self, policy: Privacy) -> list[ProviderState]:
        states = sorted(self.states.values(), key=lambda s: s.priority)
        match policy:
            case "local_only":
                return [s for s in states if s.provider.locality == "local"]
            case "local_preferred":
                return sorted(states, key=lambda s: s.provider.locality != "local")
            case _:
                return states

    async def plan(self, model: str, policy: Privacy, constraints: Constraints = UNCONSTRAINED) -> Plan:
        """The candidates for ``model`` under ``policy`` and the principal's ``constraints``.

        Raises ModelNotFound when nothing serves it, PolicyForbidden for an
        explicit remote provider under ``local_only``, Unavailable when every
        provider that could serve it is skipped, ModelNotAllowed when the allowlist
        admits none of the candidates (or the model does not exist and the allowlist
        does not name it: "does not exist" would tell such a key which names exist).
        """
        try:
            plan = await self._plan(model, stricter(policy, constraints.privacy))
        except ModelNotFound:
            if constraints.models is None or self._mentions(constraints, model):
                raise
            raise self._not_allowed(model) from None
        if constraints.models is None:
            return plan
        plan.routes = [r for r in plan.routes if self.admits(constraints, r.provider.name, r.model)]
        if not plan.routes:
            raise self._not_allowed(model)
        plan.decision.candidates = [r.provider.name for r in plan.routes]
        return plan

    def admits(self, constraints: Constraints, provider: str, model: str) -> bool:
        """Whether ``constraints``' allowlist admits ``model`` served by ``provider``."""
        return allows(constraints.models, self.states, provider, model)

    def _mentions(self, constraints: Constraints, model: str) -> bool:
        provider, name = split_model(model, self.states)
        return any(self.admits(constraints, p, name) for p in ([provider] if provider else self.states))

    @staticmethod
    def _not_allowed(model: str) -> ModelNotAllowed:
        return ModelNotAllowed(f"This API key may not use the model '{model}'.", param="model")

    async def _plan(self, model: str, policy: Privacy) -> Plan:
        resolved = self.resolve(model)
        requested = self.default_model if resolved == "default" else resolved
        decision = Decision(policy=policy, requested=requested, alias_of=model if resolved != model else None)
        explicit = self._explicit(requested)
        if explicit is not None:
            state, name = explicit
            decision.explicit = True
            if policy == "local_only" and state.provider.locality == "remote":
                raise PolicyForbidden(
                    f"provider '{state.provider.name}' is remote and this request is local_only", param="model"
                )
            routes = [Route(state.provider, name)]
        else:
            routes = []
            for state in self.ordered(policy):
                served = await self._serves(state, requested, decision)
                if served is not None:
                    routes.append(Route(state.provider, served))
        usable = []
        for route in routes:
            state = self.state_of(route)
            if state.breaker.state(self.clock()) == "open":
                decision.skipped.append(Skipped(route.provider.name, f"circuit open after: {state.last_error}"))
            else:
                usable.append(route)
        if policy == "any" and explicit is None:
            usable = [route for pool in self.fastest_first(self.pools(usable), decision) for route in pool]
        decision.candidates = [r.provider.name for r in usable]
        if not usable:
            if decision.skipped:
                reasons = "; ".join(f"{s.provider}: {s.reason}" for s in decision.skipped)
                raise Unavailable(f"no provider can serve '{requested}' now ({reasons})", retry_after=5)
            raise ModelNotFound(f"The model '{requested}' does not exist", param="model")
        return Plan(usable, decision)

    def resolve(self, model: str) -> str:
        """``model`` with LOCOPILOT_MODEL_ALIASES applied: an exact name first, then the globs in order."""
        for pattern, target in self.aliases:
            if pattern == model or fnmatch.fnmatchcase(model, pattern):
                return target
        return model

    def fastest_first(self, pools: list[list[Route]], decision: Decision) -> list[list[Route]]:
        """``pools`` (in priority order) reordered for ``any``: due a measurement, then fastest first.

        A pool counts as measured by its fastest member with a fresh latency, and as due when none has one
        and some member is due. The first due pool's due members are marked as under trial, since this
        request will try one of them (a pool of one: the route this request tries first).
        """
        now = self.clock()
        due: list[list[Route]] = []
        measured: list[tuple[float, list[Route]]] = []
        waiting: list[list[Route]] = []
        for pool in pools:
            fresh = []
            for route in pool:
                ms = self.state_of(route).latency.fresh(now)
                if ms is not None:
                    fresh.append(ms)
                    decision.latency_ms[route.provider.name] = round(ms, 3)
            if fresh:
                measured.append((min(fresh), pool))
            elif any(self.state_of(r).latency.due(now) for r in pool):
                due.append(pool)
            else:
                waiting.append(pool)
        measured.sort(key=lambda pair: pair[0])  # a stable sort: equal latencies keep priority order
        decision.measuring = [r.provider.name for pool in due for r in pool if self.state_of(r).latency.due(now)]
        if due:
            for route in due[0]:
                if self.state_of(route).latency.due(now):
                    self.state_of(route).latency.trial_at = now
        decision.order = "latency"
        return due + [pool for _, pool in measured] + waiting

    def pools(self, routes: list[Route]) -> list[list[Route]]:
        """``routes`` cut into runs of one priority and locality: the replicas of a pool, or one route alone."""
        pools: list[list[Route]] = []
        for route in routes:
            if pools and self._pool_key(pools[-1][0]) == self._pool_key(route):
                pools[-1].append(route)
            else:
                pools.append([route])
        return pools

    def _pool_key(self, route: Route) -> tuple[int, str]:
        state = self.state_of(route)
        return state.priority, state.provider.locality

    def balance(self, plan: Plan, affinity: tuple[AffinityKind, bytes] | None = None) -> None:
        """Order each pool of ``plan`` for this moment (see :mod:`locopilot.gateway.balance`): the replica
        to try first, then the others for failover. ``affinity`` keeps a conversation on one replica.

        Call it just before trying the plan: it reads the requests in flight now. An explicit provider is
        never a pool.
        """
        decision = plan.decision
        ordered: list[Route] = []
        for pool in self.pools(plan.routes) if not decision.explicit else [plan.routes]:
            if len(pool) < 2:
                ordered.extend(pool)
                continue
            loads = [self.state_of(r).load for r in pool]
            names = [r.provider.name for r in pool]
            choice = choose(
                loads,
                None if affinity is None else affinity[1],
                names,
                load_factor=self.affinity_load_factor,
                rng=self.rng,
            )
            pool = [pool[i] for i in choice.order]
            if not decision.pool:
                decision.pool = [r.provider.name for r in pool]
                decision.in_flight = {name: load.in_flight for name, load in zip(names, loads, strict=True)}
                if affinity is not None and choice.preferred is not None:
                    decision.affinity, decision.affinity_to = affinity[0], names[choice.preferred]
            ordered.extend(pool)
        plan.routes = ordered
        decision.candidates = [r.provider.name for r in ordered]

    def lease(self, route: Route) -> Lease | None:
        """Count a request in flight on ``route``'s provider until the lease is released; None when it is at
        its cap (nothing may be sent to it now)."""
        load = self.state_of(route).load
        return None if load.full() else Lease(load)

    def _explicit(self, model: str) -> tuple[ProviderState, str] | None:
        provider, name = split_model(model, self.states)
        return (self.states[provider], name) if provider is not None else None

    async def _serves(self, state: ProviderState, model: str, decision: Decision) -> str | None:
        """``model`` as ``state``'s provider names it, or None if it does not serve it."""
        names = await self.models_of(state)
        if names is None:
            decision.skipped.append(Skipped(state.provider.name, f"cannot list models: {state.last_error}"))
            return None
        if model == "auto":
            return names[0] if names else None
        return served_name(model, names)

    async def models_of(self, state: ProviderState) -> list[str] | None:
        """The provider's models: configured, else cached for MODELS_TTL; None if it cannot be asked."""
        if state.configured_models:
            return list(state.configured_models)
        if state.local_engine:
            # The folder's listing, which the provider keeps until the folder changes.
            state.models, state.models_at = await state.provider.models(), self.clock()
            names = state.models
            default = [n for n in names if n == self.default_model]
            return default + [n for n in names if n != self.default_model]
        if state.models is None or self.clock() - state.models_at > MODELS_TTL:
            await self._refresh(state)
        return state.models

    def models_changed(self, provider: str) -> None:
        """Forget ``provider``'s cached model list: a model was added or removed there."""
        state = self.states.get(provider)
        if state is not None:
            state.models = None

    async def _refresh(self, state: ProviderState) -> None:
        started = self.clock()
        try:
            with anyio.fail_after(PROBE_TIMEOUT):
                state.models = await state.provider.models()
        except (LocopilotError, TimeoutError) as exc:
            state.last_error = exc.loggable() if isinstance(exc, LocopilotError) else "timed out"
            state.breaker.failure(self.clock())
            return
        state.models_at = self.clock()
        state.probe_ms = (state.models_at - started) * 1000
        if state.breaker.state(self.clock()) != "closed":
            log.info("provider %s answers again", state.provider.name)
        state.breaker.success()

    def knows(self, provider: str, model: str) -> bool:
        """Whether ``model`` is a name a provider lists (configured or last fetched), or one the local
        engine served as ``provider`` (it has that file): a bounded set of names, unlike what clients send."""
        served_by = self.states.get(provider)
        if served_by is not None and served_by.local_engine:
            return True
        return any(
            model in state.configured_models or (state.models is not None and model in state.models)
            for state in self.states.values()
        )

    def succeeded(self, route: Route, first_event: float | None = None, decision: Decision | None = None) -> None:
        """Note a success; ``first_event`` is the seconds it took to the first event, if measured.
        ``decision``: counts an affinity hit or spill when the request was kept with a pool's replica."""
        state = self.state_of(route)
        if decision is not None and decision.affinity_to is not None and route.provider.name in decision.pool:
            outcome = "hit" if route.provider.name == decision.affinity_to else "spill"
            self.affinity_routes[route.provider.name, outcome] += 1
        state.breaker.success()
        if first_event is not None:
            state.latency.add(first_event * 1000, self.clock())

    def failed(self, route: Route, error: LocopilotError) -> None:
        """Note a failure. A busy queue is load, not ill health; the local engine keeps its own
        health per model (a broken file must not take the other models down), so neither trips a breaker."""
        state = self.state_of(route)
        state.last_error = error.loggable()
        log.warning("provider %s failed: %s", route.provider.name, state.last_error)
        if not state.local_engine and not isinstance(error, QueueFull):
            state.breaker.failure(self.clock())

    async def probe_forever(self, interval: float = PROBE_INTERVAL) -> None:
        """Ask every upstream for its models on an interval: fills the cache, closes or opens breakers."""
        while True:
            for state in list(self.states.values()):
                if not state.local_engine:
                    await self._refresh(state)
            await anyio.sleep(interval)

    async def aclose(self) -> None:
        for state in self.states.values():
            await state.provider.aclose()


DEFAULT_TAG = ":latest"


def served_name(requested: str, names: list[str]) -> str | None:
    """``requested`` as ``names`` spell it, or None: ``llama3.2`` and ``llama3.2:latest`` are one
    model (Ollama's default tag), whichever way the client and the provider write it."""
    if requested in names:
        return requested
    base = requested.removesuffix(DEFAULT_TAG)
    return next((name for name in names if name.removesuffix(DEFAULT_TAG) == base), None)


def failover_reason(error: LocopilotError) -> str:
    """A short, bounded name for why a provider failed, by the error's type (a metrics label)."""
    if isinstance(error, UpstreamError):
        if error.upstream_status == 429:
            return "upstream_429"
        if error.upstream_status is not None and error.upstream_status >= 500:
            return "upstream_5xx"
        return error.reason or "upstream_error"
    if isinstance(error, QueueFull):
        return "queue_full"
    if isinstance(error, Unavailable):
        return "unavailable"
    return "error"


def may_fail_over(error: LocopilotError) -> bool:
    """Errors another provider might not have: unavailable engines, and retryable upstream failures."""
    if isinstance(error, UpstreamError):
        return error.retryable
    return isinstance(error, Unavailable)
