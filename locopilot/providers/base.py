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
from typing import Any, Literal, Protocol, runtime_checkable

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
from locopilot.errors import InvalidRequest

__all__ = [
    "CountsTokens",
    "DescribesModels",
    "EmbeddingResult",
    "Finish",
    "FunctionTool",
    "GenerationRequest",
    "ImagePart",
    "KeepsModelsLoaded",
    "Locality",
    "Message",
    "ModelDescription",
    "Provider",
    "SamplingParams",
    "StreamEvent",
    "TextDelta",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "TopLogprob",
    "WireLogprob",
    "human_count",
    "refuse_thinking",
]

Locality = Literal["local", "remote"]


class WireLogprob(msgspec.Struct):
    """One token's log probability as OpenAI-compatible servers (a chat choice's ``content``
    list) and Ollama (``logprobs``) both send it; an alternative has no ``top_logprobs``."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[WireLogprob] | None = None

    def internal(self) -> TokenLogprob:
        return TokenLogprob(
            token=self.token,
            logprob=self.logprob,
            bytes=self.bytes,
            top=tuple(TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in self.top_logprobs or ()),
        )


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of ``prompt`` (text completion) or ``messages`` (chat) is set.

    A prompt is text, or token ids (``prompt_tokens``) that only some upstreams take.
    ``suffix`` asks for fill-in-the-middle between ``prompt`` and it. ``tools`` and
    ``tool_choice`` follow OpenAI's meaning (see :class:`ToolChoice`); ``logprobs`` is
    None for none, else how many alternatives (0-20) beside each token's own; ``n``
    choices share one prompt. Messages may carry images (:class:`ImagePart`), which
    only a provider that can see may accept; the others refuse with InvalidRequest.

    ``think`` (Ollama's): None leaves it to the backend; False asks a reasoning model not to
    think; True or an effort (``low``, ``medium``, ``high``, ``max``) asks it to, and its
    reasoning comes back as :attr:`TextDelta.thinking`. Only a provider that can pass it on
    accepts a thinking request (an Ollama upstream); the others refuse it with InvalidRequest.
    ``keep_alive``: seconds the backend should keep the model loaded after this request
    (negative: until unloaded), None for its default; passed on to an Ollama upstream (the
    embedded engine's is set by the front through the ModelManager).
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
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    keep_alive: float | None = None


class TextDelta(msgspec.Struct, frozen=True):
    """Text of choice ``index``; ``tokens`` it took; ``logprobs`` one per token when asked for.

    ``thinking``: the model's reasoning (not its answer), only when the request asked it to
    think (:attr:`GenerationRequest.think`); ``text`` may then be empty. A delta may also
    carry logprobs with no text, where the backend held text back (Ollama does, around calls).
    """

    text: str
    tokens: int
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    thinking: str = ""


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


def refuse_thinking(request: GenerationRequest) -> None:
    """InvalidRequest (Ollama's words) for a request that asks to think, from a provider that
    cannot pass thinking on; ``think`` False or absent is fine."""
    if request.think not in (None, False):
        raise InvalidRequest(f'"{request.model}" does not support thinking', param="think")


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


class ModelDescription(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider can honestly say of one of its models, in the terms of Ollama's
    ``/api/show`` (the fullest description any backend gives). Unknown is None or empty,
    never a guess. ``model_info`` holds GGUF-style keys (``general.architecture``,
    ``<arch>.context_length``, ...); ``capabilities`` Ollama's words (``completion``,
    ``tools``, ``thinking``, ``vision``, ``embedding``, ``insert``); ``modified_at`` RFC 3339.
    ``extra``: other fields of an Ollama upstream's answer (``license``, ``system``,
    ``tensors``, ``projector_info``, ...), passed on as they came.
    """

    family: str | None = None
    families: tuple[str, ...] = ()
    parameter_size: str | None = None
    quantization_level: str | None = None
    format: str | None = None
    parent_model: str | None = None
    template: str | None = None
    parameters: str | None = None
    modelfile: str | None = None
    model_info: dict[str, Any] = {}
    capabilities: tuple[str, ...] = ()
    modified_at: str | None = None
    extra: dict[str, Any] = {}


def human_count(count: int | None) -> str | None:
    """A parameter count as Ollama writes it (``134.52M``, ``1.2B``); None when unknown."""
    if not count:
        return None
    for size, unit, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if count >= size:
            value = count / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{digits}f}{unit}"
    return str(count)


@runtime_checkable
class DescribesModels(Protocol):
    """A provider that can describe one of its models (``model``: its own name for it)."""

    async def describe(self, model: str) -> ModelDescription:
        """Raises ModelNotFound when it does not serve ``model``, UpstreamError when it cannot be asked."""
        ...


@runtime_checkable
class KeepsModelsLoaded(Protocol):
    """A provider whose backend loads and unloads models on request (an Ollama upstream)."""

    async def keep_loaded(self, model: str, seconds: float | None, *, embedding: bool = False) -> str:
        """Load ``model`` and keep it ``seconds`` (negative: until unloaded; None: the backend's
        default), or with 0 unload it; what the backend did (``load`` or ``unload``).
        ``embedding``: ask as for an embedding model."""
        ...
