"""The Provider protocol: one async streaming method per kind of work.

Upstream failures are :class:`locopilot.errors.UpstreamError`, with
``retryable`` True when another provider might succeed (connection refused,
timeout, 5xx, 429) — the router fails over only on those, and only before the
first event.

A provider turns a :class:`GenerationRequest` into an async stream of
:class:`TextDelta` events ending with exactly one :class:`Finish`. A
non-streaming response is the stream collected. Errors before the first event
are raised from the first ``__anext__`` (so the HTTP status can still say what
happened); errors after it are raised mid-stream. Whoever iterates the stream
closes it (``aclose``), which cancels the work in the backend.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Literal, Protocol

import msgspec

from locopilot.engine.protocol import SamplingParams

Locality = Literal["local", "remote"]


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of ``prompt`` (text completion) or ``messages`` (chat) is set."""

    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    stop: list[str] = []
    echo: bool = False
    grammar: str | None = None
    json_schema: str | None = None
    sampling: SamplingParams = SamplingParams()


class TextDelta(msgspec.Struct, frozen=True):
    text: str
    tokens: int


class Finish(msgspec.Struct, frozen=True):
    """``reason`` is ``stop`` or ``length`` (or ``cancelled`` when the stream was cancelled).

    ``cached_tokens``: of the prompt tokens, how many the backend reused from its
    prompt cache instead of computing (0 when it does not say).
    """

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


StreamEvent = TextDelta | Finish


class EmbeddingResult(msgspec.Struct, frozen=True):
    vectors: list[list[float]]
    prompt_tokens: int


class Provider(Protocol):
    name: str
    locality: Locality

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Generate; see the module docstring for the stream's contract."""
        ...

    async def embed(self, model: str, inputs: list[str]) -> EmbeddingResult:
        """One vector per input, in order."""
        ...

    async def models(self) -> list[str]:
        """The names of the models this provider serves now, without any provider prefix.

        Raises UpstreamError when the provider cannot be asked.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; called once at shutdown."""
        ...
