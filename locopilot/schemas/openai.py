"""OpenAI wire types.

Requests are tolerant of fields we do not know (clients send many) and strict
about the ones we act on: ranges, sizes and types are checked while decoding,
before any work. Limits that are settings (the text of one message) are checked
by the handlers, and fields that would redirect a request (``api_base``…) are
refused before decoding (:mod:`locopilot.gateway.hygiene`). Responses are
encoded as they are defined here.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from locopilot.training.lineage import Lineage

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


# Requests


class TextPart(Struct, tag="text", tag_field="type"):
    text: str


class ImageUrlPart(Struct, tag="image_url", tag_field="type"):
    image_url: dict[str, str]


class InputAudioPart(Struct, tag="input_audio", tag_field="type"):
    input_audio: dict[str, str]


ContentPart = TextPart | ImageUrlPart | InputAudioPart


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: ShortText | None = None


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
    tools: list[dict[str, object]] | None = None
    tool_choice: str | dict[str, object] | None = None
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


class AssistantMessage(Struct):
    content: str
    role: str = "assistant"


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


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


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
    loaded: bool = False
    error: str | None = None
    lineage: Lineage | None = None
    """For a model fine-tuned here: its base, dataset and job (see locopilot.training.lineage)."""


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


encoder = msgspec.json.Encoder()
