"""The objects a request handler needs, built by the app's lifespan."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from litestar.di import Provide

from locopilot.engine.protocol import CpuBackend, GpuDevice
from locopilot.engine.supervisor import ModelManager
from locopilot.gateway.auth import Authenticator
from locopilot.gateway.hygiene import HostCheck
from locopilot.gateway.metrics import Metrics
from locopilot.gateway.ratelimit import RateLimiter
from locopilot.gateway.router import Router
from locopilot.gateway.shutdown import Shutdown
from locopilot.gateway.usage import UsageRecorder
from locopilot.models.catalog import ModelCatalog
from locopilot.models.pull import Puller
from locopilot.settings import Settings
from locopilot.store.db import Database
from locopilot.training.jobs import JobService


@dataclass
class EngineStatus:
    """What the startup probe of llama.cpp found; ``ready`` stays False until it ends well."""

    ready: bool = False
    detail: str = "starting"
    llama_cpp_version: str | None = None
    devices: list[str] = field(default_factory=list)
    cpu: CpuBackend | None = None
    gpus: list[GpuDevice] = field(default_factory=list)
    gpu_note: str = ""


@dataclass(frozen=True)
class Pipeline:
    """What the generation pipeline (:mod:`locopilot.api.generation`) uses, and all a generation handler needs."""

    settings: Settings
    router: Router
    auth: Authenticator
    limiter: RateLimiter
    recorder: UsageRecorder
    shutdown: Shutdown


@dataclass(frozen=True)
class Library:
    """What showing and managing models uses: the embedded engine's models folder, what the store records of
    each, the runners that load them, and the router that knows every provider's models and who may use them."""

    catalog: ModelCatalog
    db: Database
    manager: ModelManager
    router: Router


@dataclass
class Services:
    """Every service the app's lifespan builds, kept in ``app.state.services`` until it stops.

    No handler takes this: each takes the services it uses, by their names here (``db: Database``,
    ``router: Router``...), through the dependencies :func:`dependencies` makes, or a bundle
    such as :class:`Pipeline` or :class:`Library` where one job needs several."""

    settings: Settings
    db: Database
    catalog: ModelCatalog
    manager: ModelManager
    router: Router
    recorder: UsageRecorder
    engine: EngineStatus
    auth: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    shutdown: Shutdown
    training: JobService
    puller: Puller
    hosts: HostCheck
    started_at: float = field(default_factory=time.time)

    @cached_property
    def pipeline(self) -> Pipeline:
        return Pipeline(self.settings, self.router, self.auth, self.limiter, self.recorder, self.shutdown)

    @cached_property
    def library(self) -> Library:
        return Library(self.catalog, self.db, self.manager, self.router)


DEPENDENCIES = (*(f.name for f in fields(Services)), "pipeline", "library")
"""The dependency names a handler may take: each service by its field name, and the bundles."""


def dependencies(services: Callable[[], Services]) -> dict[str, Provide]:
    """The app's dependencies, one per name in :data:`DEPENDENCIES`; ``services`` returns the lifespan's
    :class:`Services` (they do not exist yet when the app is made).

    Each provider takes no arguments, so Litestar parses nothing and makes no object to resolve one:
    a handler pays one call per service it names."""

    def provider(name: str) -> Provide:
        def provide() -> Any:
            return getattr(services(), name)

        return Provide(provide, sync_to_thread=False)

    return {name: provider(name) for name in DEPENDENCIES}
