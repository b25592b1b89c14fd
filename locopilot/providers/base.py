"""The Provider protocol: one async streaming method per kind of work.

Upstream failures are :class:`locopilot.errors.UpstreamError`, with
``retryable`` True when another provider might succeed (connection refused,
timeout, 5xx, 429) — the router fails over only on those, and only before the
first event.

A provider turns a :class:`GenerationRequest` into an async stream of
:class:`TextDelta` and :class:`ToolCallDelta` events ending with exactly one
:class:`Finish`. The chat types (:class:`Message`, :class:`ToolCall`,
:class:`FunctionTool`, :class:`ToolChoice`, logprobs) are the runner protocol's,
re-exported here: every front translates into them and every provider out of them. A
non-streaming response is the stream collected. Errors before the first event
are raised from the first ``__anext__`` (so the HTTP status can still say what
happened); errors after it are raised mid-stream. Whoever iterates the stream
closes it (``aclose``), which cancels the work in the backend.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Literal, Protocol, runtime_checkable

import msgspec

from locopilot.engine.protocol import (
    FunctionTool,
    ImagePart,
    Message,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    TopLogprob,
)

__all__ = [
    "CountsTokens",
    "EmbeddingResult",
    "Finish",
    "FunctionTool",
    "GenerationRequest",
    "ImagePart",
    "Locality",
    "Message",
    "Provider",
    "SamplingParams",
    "StreamEvent",
    "TextDelta",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "TopLogprob",
]

Locality = Literal["local", "remote"]


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of ``prompt`` (text completion) or ``messages`` (chat) is set.

    A prompt is text, or token ids (``prompt_tokens``) that only some upstreams take.
    ``suffix`` asks for fill-in-the-middle between ``prompt`` and it. ``tools`` and
    ``tool_choice`` follow OpenAI's meaning (see :class:`ToolChoice`); ``logprobs`` is
    None for none, else how many alternatives (0-20) beside each token's own; ``n``
    choices share one prompt. Messages may carry images (:class:`ImagePart`), which
    only a provider that can see may accept; the others refuse with InvalidRequest.
    """

    model: str
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    suffix: str | None = None
    messages: list[Message] | None = None
    max_tokens: int | None = None
    stop: list[str] = []
    echo: bool = False
    grammar: str | None = None
    json_schema: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    logprobs: int | None = None
    n: int = 1
    sampling: SamplingParams = SamplingParams()


class TextDelta(msgspec.Struct, frozen=True):
    """Text of choice ``index``; ``tokens`` it took; ``logprobs`` one per token when asked for."""

    text: str
    tokens: int
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    """Part of the ``call``-th tool call (0, 1, ...) of choice ``index``.

    The first part of a call carries its ``id`` and ``name``; ``arguments`` (JSON
    text of an object) may arrive whole in it or in pieces over later parts. A
    provider sends only calls whose arguments parse as JSON once complete.
    """

    call: int
    index: int = 0
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    tokens: int = 0


class Finish(msgspec.Struct, frozen=True):
    """``reason`` is ``stop``, ``length`` or ``tool_calls`` (or ``cancelled`` when the stream was
    cancelled), for choice 0; with ``n`` > 1, ``reasons`` holds every choice's in order.

    ``cached_tokens``: of the prompt tokens, how many the backend reused from its
    prompt cache instead of computing (0 when it does not say).
    ``tool_parse_failures``: calls the model generated that could not be parsed
    (counted per model in the metrics; their text went out as content).
    ``stop``: which of the request's ``stop`` strings ended choice 0, when one did and the
    backend says (the embedded engine does; OpenAI-compatible upstreams that send vLLM's
    ``stop_reason``, locopilot among them, do); None otherwise.
    ``load_seconds``: of the time before the first event, how long the model took to
    load for this request (0 when it was loaded already, or the backend does not say).
    """

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasons: tuple[str, ...] = ()
    tool_parse_failures: int = 0
    stop: str | None = None
    load_seconds: float = 0.0


StreamEvent = TextDelta | ToolCallDelta | Finish


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


@runtime_checkable
class CountsTokens(Protocol):
    """A provider that can count a prompt's tokens as its model sees them (the embedded engine)."""

    async def count_tokens(self, request: GenerationRequest) -> int:
        """The tokens of ``request``'s prompt: its messages (and tools) through the model's
        chat template, tokenized by the model's tokenizer. Raises as ``stream`` would before its first event."""
        ...
