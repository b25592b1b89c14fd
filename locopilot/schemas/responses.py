"""OpenAI Responses API wire types (``/v1/responses``).

The request is tolerant of fields we do not act on and strict about those we do.
``input`` items are decoded one at a time (:data:`INPUT_ITEMS`), because a message
item may leave out its ``type``; stored items are kept in the same shapes and read
back through the same decoding, so a conversation rebuilt from the database is
checked exactly as one sent by a client. Responses are encoded as defined here and
parse in the official ``openai`` client.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from locopilot.schemas.openai import Probability, Temperature

MAX_INPUT_ITEMS = 1000
MAX_METADATA_PAIRS = 16
MetadataKey = Annotated[str, Meta(max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]
ResponseId = Annotated[str, Meta(min_length=1, max_length=128)]


# Requests


class JsonSchemaTextFormat(Struct, tag="json_schema", tag_field="type", kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)] = "response"
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class JsonObjectTextFormat(Struct, tag="json_object", tag_field="type"):
    pass


class PlainTextFormat(Struct, tag="text", tag_field="type"):
    pass


TextFormat = PlainTextFormat | JsonObjectTextFormat | JsonSchemaTextFormat


class TextConfig(Struct, kw_only=True):
    format: TextFormat = field(default_factory=PlainTextFormat)
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(Struct, kw_only=True):
    """``POST /v1/responses``. ``tools`` and ``tool_choice`` are read by the handler: tool types
    locopilot cannot run are refused by name there, not by a decoding error."""

    model: Annotated[str, Meta(min_length=1, max_length=256)]
    input: str | Annotated[list[dict[str, Any]], Meta(max_length=MAX_INPUT_ITEMS)] = ""
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1, le=65_536)] | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    text: TextConfig | None = None
    tools: Annotated[list[dict[str, Any]], Meta(max_length=128)] = []
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=MAX_METADATA_PAIRS)] | None = None
    store: bool | None = None
    previous_response_id: ResponseId | None = None
    stream: bool = False
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


# Items: input and output. Each is also how a stored item is kept and read back.


class InputTextPart(Struct, tag="input_text", tag_field="type"):
    text: str


class OutputTextPart(Struct, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Any] = []


class RefusalPart(Struct, tag="refusal", tag_field="type"):
    refusal: str


class InputImagePart(Struct, tag="input_image", tag_field="type", kw_only=True):
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class InputFilePart(Struct, tag="input_file", tag_field="type", kw_only=True):
    file_id: str | None = None
    filename: str | None = None


ContentPart = InputTextPart | OutputTextPart | RefusalPart | InputImagePart | InputFilePart


class MessageItem(Struct, tag="message", tag_field="type", kw_only=True):
    """A message, in the input (``content`` may then be a string) or the output."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(Struct, tag="function_call", tag_field="type", kw_only=True):
    call_id: Annotated[str, Meta(min_length=1, max_length=256)]
    name: Annotated[str, Meta(max_length=256)]
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(Struct, tag="function_call_output", tag_field="type", kw_only=True):
    call_id: Annotated[str, Meta(min_length=1, max_length=256)]
    output: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ReasoningItem(Struct, tag="reasoning", tag_field="type", kw_only=True):
    """Accepted in the input and ignored: no model here takes another's reasoning back."""

    id: str | None = None
    summary: list[Any] = []
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class ItemReference(Struct, tag="item_reference", tag_field="type"):
    """An item of an earlier stored response, by its id."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem | ItemReference
INPUT_ITEMS: dict[str, type[InputItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
    "item_reference": ItemReference,
}


# Responses


class InputTokensDetails(Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(Struct):
    code: str
    message: str


class FunctionToolSpec(Struct, tag="function", tag_field="type", kw_only=True):
    """A function tool in the Responses API's flat shape."""

    name: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class FunctionChoice(Struct, tag="function", tag_field="type"):
    name: str


class Reasoning(Struct):
    effort: str | None = None
    summary: str | None = None


OutputItem = MessageItem | FunctionCallItem


class ResponseObject(Struct, kw_only=True):
    """A model response: the answer to ``POST /v1/responses`` and ``GET /v1/responses/{id}``."""

    id: str
    created_at: int
    model: str
    status: Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
    output: list[OutputItem] = []
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = {}
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig = field(default_factory=TextConfig)
    tool_choice: str | FunctionChoice = "auto"
    tools: list[FunctionToolSpec] = []
    truncation: str = "disabled"
    store: bool = True
    background: bool = False
    reasoning: Reasoning = field(default_factory=Reasoning)
    user: str | None = None
    completed_at: int | None = None
    object: Literal["response"] = "response"


class ResponseDeleted(Struct):
    id: str
    deleted: bool = True
    object: Literal["response"] = "response"


class ItemList(Struct):
    """``GET /v1/responses/{id}/input_items``: items as they are stored (dicts, each with an ``id``)."""

    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


# Stream events: each is one SSE event, ``event: <type>`` then ``data: <json>``.


class ResponseEvent(Struct, kw_only=True, tag_field="type"):
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent, kw_only=True):
    response: ResponseObject


class Created(ResponseLifecycleEvent, tag="response.created"):
    pass


class InProgress(ResponseLifecycleEvent, tag="response.in_progress"):
    pass


class Completed(ResponseLifecycleEvent, tag="response.completed"):
    pass


class Incomplete(ResponseLifecycleEvent, tag="response.incomplete"):
    pass


class Failed(ResponseLifecycleEvent, tag="response.failed"):
    pass


class OutputItemAdded(ResponseEvent, tag="response.output_item.added", kw_only=True):
    output_index: int
    item: OutputItem


class OutputItemDone(ResponseEvent, tag="response.output_item.done", kw_only=True):
    output_index: int
    item: OutputItem


class ContentPartAdded(ResponseEvent, tag="response.content_part.added", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    part: OutputTextPart


class ContentPartDone(ResponseEvent, tag="response.content_part.done", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    part: OutputTextPart


class OutputTextDelta(ResponseEvent, tag="response.output_text.delta", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class OutputTextDone(ResponseEvent, tag="response.output_text.done", kw_only=True):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ArgumentsDelta(ResponseEvent, tag="response.function_call_arguments.delta", kw_only=True):
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(ResponseEvent, tag="response.function_call_arguments.done", kw_only=True):
    item_id: str
    output_index: int
    arguments: str
    name: str | None = None


class ErrorEvent(ResponseEvent, tag="error", kw_only=True):
    message: str
    code: str | None = None
    param: str | None = None
