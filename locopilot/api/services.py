"""The objects a request handler needs, built by the app's lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

from litestar.datastructures import State

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


@dataclass
class Services:
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


def get_services(state: State) -> Services:
    services: Services = state.services
    return services


def get_pipeline(state: State) -> Pipeline:
    """The ``pipeline`` dependency: a handler that only generates takes this, not every service."""
    return get_services(state).pipeline
