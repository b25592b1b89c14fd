"""OpenAI wire types.

Requests are tolerant of fields we do not know (clients send many) and strict
about the ones we act on: ranges, sizes and types are checked while decoding,
before any work. Limits that are settings (the text of one message) are checked
by the handlers, and fields that would redirect a request (``api_base``…) are
refused before decoding (:mod:`locopilot.gateway.hygiene`). Responses are
encoded as they are defined here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from locopilot.training.lineage import Lineage

if TYPE_CHECKING:
    from locopilot.models.catalog import ModelEntry
    from locopilot.store.models import ModelRecord

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TokenCount = Annotated[int, Meta(ge=1, le=65_536)]
# OpenAI allows 4 stop strings; chat clients that stop on every template marker send more.
MAX_STOP_STRINGS = 16
StopString = Annotated[str, Meta(max_length=512)]
StopStrings = StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)]
MAX_MESSAGES = 500
MAX_LOGIT_BIAS = 300
ShortText = Annotated[str, Meta(max_length=256)]
MAX_TOOLS = 128  # OpenAI's limit (checked again, with the front's param, by locopilot.api.tools)
MAX_TOOL_CALLS = 128


# Requests


class TextPart(Struct, tag="text", tag_field="type"):
    text: str


class ImageUrl(Struct):
    url: Annotated[str, Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImageUrlPart(Struct, tag="image_url", tag_field="type"):
    image_url: ImageUrl


class InputAudioPart(Struct, tag="input_audio", tag_field="type"):
    input_audio: dict[str, str]


ContentPart = TextPart | ImageUrlPart | InputAudioPart


class CalledFunction(Struct):
    # Empty defaults, so that a missing name or arguments is the handler's 400 with its param.
    name: str = ""
    arguments: str = ""


class ToolCallSpec(Struct):
    """A call in an assistant message of the history."""

    id: Annotated[str, Meta(max_length=256)] = ""
    type: Literal["function"] = "function"
    function: CalledFunction = msgspec.field(default_factory=CalledFunction)


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: ShortText | None = None
    tool_calls: Annotated[list[ToolCallSpec], Meta(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: Annotated[str, Meta(max_length=256)] | None = None


class FunctionDefinition(Struct):
    name: str = ""  # a missing name is the handler's 400, with its param
    description: str | None = None
    parameters: dict[str, object] | None = None
    strict: bool | None = None


class ToolSpec(Struct):
    """A tool the model may call. Only ``function`` tools exist on this API; another
    ``type`` is refused by the handler, naming it."""

    type: ShortText = "function"
    function: FunctionDefinition = msgspec.field(default_factory=FunctionDefinition)


class ChosenFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    type: Literal["function"]
    function: ChosenFunction


ToolChoiceSpec = Literal["auto", "none", "required"] | NamedToolChoice


class StreamOptions(Struct):
    include_usage: bool = False


class JsonSchemaFormat(Struct):
    name: str = "response"
    schema: dict[str, object] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(Struct, kw_only=True):
    """Fields shared by chat and text completions."""

    model: Annotated[str, Meta(min_length=1, max_length=256)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    min_p: Probability | None = None
    stop: StopStrings | None = None
    # llama.cpp seeds are 32-bit; 0xFFFFFFFF means "random" there.
    seed: Annotated[int, Meta(ge=0, le=0xFFFFFFFE)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    logit_bias: (
        Annotated[dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=MAX_LOGIT_BIAS)] | None
    ) = None
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    logprobs: bool | Annotated[int, Meta(ge=0, le=20)] | None = None
    user: ShortText | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: TokenCount | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolSpec], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoiceSpec | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # msgspec allows one array type per union, so token arrays are checked by the handler.
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None


class EmbeddingRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1, le=65_536)] | None = None
    user: ShortText | None = None


# Responses


class PromptTokensDetails(Struct, frozen=True):
    cached_tokens: int = 0
    """Prompt tokens reused from the prompt cache rather than computed."""


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)


class FunctionCall(Struct):
    name: str
    arguments: str
    """The JSON text of an object."""


class ToolCallOut(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class AssistantMessage(Struct):
    """``content`` is null when the reply is only tool calls; ``tool_calls`` is absent when there are none."""

    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class ChatTopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Struct):
    """One generated token: its text, log probability, UTF-8 bytes and likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(Struct):
    """The legacy completions form: parallel lists, one entry per token. ``top_logprobs`` maps token
    text to logprob (the token's own among them); ``text_offset`` is where each token's text starts,
    counted in characters from the start of the prompt."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    # vLLM's extension, present when a stop string ended the choice: which one.
    stop_reason: str | UnsetType = UNSET


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class FunctionCallDelta(Struct):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallChunk(Struct):
    """One piece of a streamed call: ``index`` says which call; ``id``, ``type`` and the
    function's ``name`` come in its first piece only, as OpenAI streams them."""

    index: int
    function: FunctionCallDelta
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallChunk] | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    stop_reason: str | UnsetType = UNSET  # as ChatChoice's


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    # Present (as null) on every chunk when the client asked for usage, as OpenAI does.
    usage: Usage | UnsetType | None = UNSET


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET


class EmbeddingData(Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct):
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


class ModelCard(Struct):
    """One model. Fields after ``owned_by`` are locopilot's own; clients ignore them."""

    id: str
    created: int
    owned_by: str
    object: str = "model"
    provider: str = "embedded"
    locality: str = "local"
    size_bytes: int | None = None
    architecture: str | None = None
    quantization: str | None = None
    parameter_count: int | None = None
    context_length: int | None = None
    chat_template: str | None = None
    tools: str | None = None
    """How the embedded engine calls tools with this model: ``native:<format>`` (its template's own
    syntax: hermes, llama3, mistral, mistral-args) or ``generic`` (a template that knows no tools)."""
    loaded: bool = False
    error: str | None = None
    lineage: Lineage | None = None
    """For a model fine-tuned here: its base, dataset and job (see locopilot.training.lineage)."""
    adapter_of: str | None = None
    """For a LoRA adapter: the model it runs on (served by that model's runner, no second copy)."""
    source: str | None = None
    """Where the model came from (a pull ref, a URL, ``file:PATH``); null when it was copied in by hand."""
    sha256: str | None = None
    arrived_at: float | None = None
    """Unix seconds."""


def model_card(
    entry: ModelEntry, loaded: bool, lineage: Lineage | None = None, record: ModelRecord | None = None
) -> ModelCard:
    """The card of an embedded model: its header's facts, and where it came from when recorded."""
    return ModelCard(
        id=entry.name,
        created=entry.modified,
        owned_by="locopilot",
        size_bytes=entry.size_bytes,
        architecture=entry.architecture,
        quantization=entry.quantization,
        parameter_count=entry.parameter_count,
        context_length=entry.context_length,
        chat_template=entry.chat_template,
        tools=entry.tools,
        loaded=loaded,
        error=entry.error,
        lineage=lineage,
        adapter_of=entry.adapter_of,
        source=record.source if record else None,
        sha256=record.sha256 if record else None,
        arrived_at=record.arrived_at if record else None,
    )


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


encoder = msgspec.json.Encoder()
