"""Routing: a request's model name → the provider that serves it.

Today there is one provider, the embedded engine, and a model is a GGUF file
in the models folder. ``default`` names ``LOCOPILOT_DEFAULT_MODEL``. Unknown
names are a 404 ``model_not_found``; names that could address a path are a 400.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from locopilot.models.catalog import ModelCatalog
from locopilot.providers.base import Provider


@dataclass(frozen=True)
class Route:
    provider: Provider
    model: str


class Router:
    def __init__(self, catalog: ModelCatalog, embedded: Provider, default_model: str) -> None:
        self.catalog = catalog
        self.embedded = embedded
        self.default_model = default_model

    async def route(self, model: str) -> Route:
        """Raises InvalidModelName or ModelNotFound."""
        name = self.default_model if model == "default" else model
        # The first look at a model parses its header: not on the event loop.
        await anyio.to_thread.run_sync(self.catalog.get, name)
        return Route(self.embedded, name)
