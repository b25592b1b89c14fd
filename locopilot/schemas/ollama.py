"""Ollama's native API (``/api/*``) wire types, with Ollama's field names.

As in Ollama, requests are tolerant: unknown fields and unknown ``options`` are
ignored. The fields we act on are checked while decoding (types, ranges), so a
bad value is a 400 in Ollama's error shape (``{"error": "..."}``) before any work.
Durations in answers are nanoseconds; ``created_at`` and ``modified_at`` are
RFC 3339 times. A field Ollama leaves out of an object (the statistics of a
chunk that is not the last) is left out here too (``UNSET``, which msgspec never writes).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

ModelName = Annotated[str, Meta(max_length=256)]
StopString = Annotated[str, Meta(max_length=512)]
MAX_STOP_STRINGS = 16
MAX_MESSAGES = 500
MAX_TOOLS = 128
# A number is seconds; a string is a Go duration ("5m", "1h30m", "0"); negative keeps the model loaded.
KeepAlive = float | int | str


# Requests


class Options(Struct, kw_only=True):
    """The ``options`` locopilot acts on; any other option is ignored, as Ollama ignores unknown ones."""

    num_predict: Annotated[int, Meta(ge=-2, le=1_048_576)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    # llama.cpp seeds are 32-bit; Ollama's -1 (or any negative) means a random one.
    seed: Annotated[int, Meta(le=0xFFFFFFFE)] | None = None
    stop: Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    num_ctx: Annotated[int, Meta(ge=1, le=16_777_216)] | None = None


class CallFunction(Struct, kw_only=True):
    name: Annotated[str, Meta(max_length=256)]
    arguments: dict[str, Any] = {}
    index: int | None = None


class ToolCall(Struct, kw_only=True):
    """A call in an assistant message; Ollama's arguments are an object, not JSON text."""

    function: CallFunction
    id: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: Annotated[list[str], Meta(max_length=16)] | None = None
    tool_calls: Annotated[list[ToolCall], Meta(max_length=MAX_TOOLS)] | None = None
    tool_name: Annotated[str, Meta(max_length=256)] | None = None
    thinking: str | None = None


class FunctionSpec(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionSpec


class GenerationFields(Struct, kw_only=True):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model: ModelName
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: KeepAlive | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatRequest(GenerationFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(max_length=MAX_MESSAGES)] = []
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None


class GenerateRequest(GenerationFields, kw_only=True):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(Struct, kw_only=True):
    model: ModelName
    input: str | Annotated[list[str], Meta(max_length=2048)] = ""
    truncate: bool | None = None
    options: Options | None = None
    keep_alive: KeepAlive | None = None
    dimensions: int | None = None


class EmbeddingsRequest(Struct, kw_only=True):
    """The older ``/api/embeddings``: one ``prompt``, one vector."""

    model: ModelName
    prompt: str = ""
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class ModelRequest(Struct, kw_only=True):
    """``/api/show``, ``/api/delete`` and ``/api/pull`` name a model as ``model`` (``name`` in older clients)."""

    model: ModelName = ""
    name: ModelName = ""
    verbose: bool = False
    stream: bool = True
    insecure: bool = False

    @property
    def model_name(self) -> str:
        return self.model or self.name


class CopyRequest(Struct, kw_only=True):
    source: ModelName
    destination: ModelName


# Answers


class ModelDetails(Struct, kw_only=True):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class TagModel(Struct, kw_only=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagList(Struct, kw_only=True):
    models: list[TagModel]


class RunningModel(Struct, kw_only=True):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class RunningList(Struct, kw_only=True):
    models: list[RunningModel]


class ShowResponse(Struct, kw_only=True):
    """``/api/show``'s answer. An upstream Ollama's ``license``, ``system``, ``tensors`` and the
    like are added to it as they came (see locopilot.providers.ollama.SHOW_EXTRA)."""

    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(Struct, kw_only=True):
    version: str


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: dict[str, Any]
    index: int


class CallOut(Struct, kw_only=True):
    function: FunctionCall
    id: str | UnsetType = UNSET


class MessageOut(Struct, kw_only=True):
    role: str = "assistant"
    content: str = ""
    thinking: str | UnsetType = UNSET
    tool_calls: list[CallOut] | UnsetType = UNSET


class TokenLogprobOut(Struct, kw_only=True):
    """One token's log probability as Ollama writes it: ``bytes`` are the token's UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | UnsetType = UNSET


class LogprobOut(TokenLogprobOut, kw_only=True):
    top_logprobs: list[TokenLogprobOut] | UnsetType = UNSET


class Statistics(Struct, kw_only=True):
    """The last object's statistics; every duration in nanoseconds."""

    done_reason: str | UnsetType = UNSET
    total_duration: int | UnsetType = UNSET
    load_duration: int | UnsetType = UNSET
    prompt_eval_count: int | UnsetType = UNSET
    prompt_eval_duration: int | UnsetType = UNSET
    eval_count: int | UnsetType = UNSET
    eval_duration: int | UnsetType = UNSET


class ChatChunk(Statistics, kw_only=True):
    model: str
    created_at: str
    message: MessageOut
    done: bool
    logprobs: list[LogprobOut] | UnsetType = UNSET


class GenerateChunk(Statistics, kw_only=True):
    model: str
    created_at: str
    response: str
    thinking: str | UnsetType = UNSET
    done: bool
    logprobs: list[LogprobOut] | UnsetType = UNSET


class EmbedResponse(Struct, kw_only=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(Struct, kw_only=True):
    embedding: list[float]


encoder = msgspec.json.Encoder()
