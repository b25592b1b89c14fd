"""Anthropic Messages API wire types (``/v1/messages``, ``/v1/messages/count_tokens``, Anthropic's model list).

As for the OpenAI types: requests are tolerant of fields we do not know (clients send
``cache_control``, ``thinking``, ``service_tier``…, which are accepted and ignored) and
strict about the ones we act on: ranges, sizes and types are checked while decoding,
before any work; the per-message text limit (a setting) is checked by the handler.
Content blocks and tool choices are tagged unions on ``type``: a block type we cannot
act on (``document``, server tools' results) is refused with the field that holds it.
Responses and stream events are encoded as defined here, in Anthropic's field order.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from locopilot.schemas.openai import MAX_STOP_STRINGS, ModelCard, Probability, ShortText, StopString

# Anthropic allows 100,000 messages; an agent's long tool loop runs to thousands. The body
# size limit (LOCOPILOT_MAX_BODY_BYTES) bounds the whole.
MAX_MESSAGES = 10_000
MAX_TOOLS = 512
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
# Agents ask for their own model's output limit (32k, 64k, 128k); the engine caps it at the context left.
MaxTokens = Annotated[int, Meta(ge=1, le=1 << 20)]
Temperature = Annotated[float, Meta(ge=0.0, le=1.0)]  # Anthropic's range


# Requests: content blocks


class TextBlock(Struct, tag="text", tag_field="type"):
    text: str


class Base64Source(Struct, tag="base64", tag_field="type"):
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class UrlSource(Struct, tag="url", tag_field="type"):
    url: Annotated[str, Meta(max_length=8192)]


class FileSource(Struct, tag="file", tag_field="type"):
    file_id: str


class ImageBlock(Struct, tag="image", tag_field="type"):
    source: Base64Source | UrlSource | FileSource


class DocumentBlock(Struct, tag="document", tag_field="type"):
    """Accepted by the decoder only to be refused by name (PDFs and text documents are not read here)."""


class ToolUseBlock(Struct, tag="tool_use", tag_field="type"):
    id: Annotated[str, Meta(min_length=1, max_length=256)]
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    input: dict[str, Any]


class ToolResultBlock(Struct, tag="tool_result", tag_field="type"):
    tool_use_id: Annotated[str, Meta(min_length=1, max_length=256)]
    content: str | list[TextBlock | ImageBlock | DocumentBlock] = ""
    is_error: bool = False


class ThinkingBlock(Struct, tag="thinking", tag_field="type"):
    """A previous turn's reasoning, sent back by agents: accepted and left out of the prompt."""

    thinking: str = ""


class RedactedThinkingBlock(Struct, tag="redacted_thinking", tag_field="type"):
    pass


ContentBlock = (
    TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
)


class InputMessage(Struct):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


# Requests: tools


class Tool(Struct, kw_only=True):
    """A client tool. Anthropic's server tools (``web_search_…``, ``bash_…``) have another
    ``type`` and no ``input_schema``; the handler refuses them by name."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None


class ToolChoiceAuto(Struct, tag="auto", tag_field="type"):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Struct, tag="any", tag_field="type"):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Struct, tag="tool", tag_field="type"):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Struct, tag="none", tag_field="type"):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(Struct):
    user_id: ShortText | None = None


class PromptFields(Struct, kw_only=True):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share: the prompt as the model sees it."""

    model: ModelName
    messages: Annotated[list[InputMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(PromptFields, kw_only=True):
    max_tokens: MaxTokens
    stop_sequences: Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    metadata: Metadata | None = None


class CountTokensRequest(PromptFields, kw_only=True):
    pass


# Responses


class TextContent(Struct, tag="text", tag_field="type"):
    text: str


class ToolUseContent(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


ResponseBlock = TextContent | ToolUseContent


class Usage(Struct, kw_only=True):
    """``input_tokens`` are the prompt tokens computed; those reused from the prompt cache are
    ``cache_read_input_tokens`` (the prompt is their sum, as in Anthropic's usage)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageResponse(Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ResponseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class TokenCount(Struct):
    input_tokens: int


# Stream events: each goes out as ``event: <type>`` and ``data: <the event as JSON>``


class MessageStart(Struct, tag="message_start", tag_field="type"):
    message: MessageResponse


class ContentBlockStart(Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: ResponseBlock


class TextDelta(Struct, tag="text_delta", tag_field="type"):
    text: str


class InputJsonDelta(Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class ContentBlockDelta(Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(Struct, tag="content_block_stop", tag_field="type"):
    index: int


class StopDelta(Struct):
    stop_reason: StopReason
    stop_sequence: str | None


class MessageDelta(Struct, tag="message_delta", tag_field="type"):
    """``usage`` is cumulative: the SDK takes each count given as the total."""

    delta: StopDelta
    usage: Usage


class MessageStop(Struct, tag="message_stop", tag_field="type"):
    pass


class Ping(Struct, tag="ping", tag_field="type"):
    pass


StreamEvent = (
    MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop | Ping
)


# Anthropic's model list (``GET /v1/models`` with an ``anthropic-version`` header)


class ModelInfo(Struct, kw_only=True):
    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str  # RFC 3339
    max_input_tokens: int | None = None


class ModelPage(Struct, kw_only=True):
    data: list[ModelInfo]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def model_info(card: ModelCard) -> ModelInfo:
    """One model of ``GET /v1/models`` as Anthropic's list shows it."""
    created = datetime.datetime.fromtimestamp(card.created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ModelInfo(id=card.id, display_name=card.id, created_at=created, max_input_tokens=card.context_length)


def model_page(cards: list[ModelCard]) -> ModelPage:
    data = [model_info(card) for card in cards]
    return ModelPage(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


encoder = msgspec.json.Encoder()
