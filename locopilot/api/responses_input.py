"""The Responses API's request as one GenerationRequest: items in, chat messages out.

``input`` (text or items), ``instructions``, the items of a stored chain and the
tools become :class:`~locopilot.providers.base.Message`, :class:`FunctionTool` and
:class:`ToolChoice`, checked as every front checks them
(:func:`~locopilot.api.tools.check_tools`). Each input item is decoded on its own
(:func:`decode_item`) and kept in its stored form (:func:`normalized`: an id, a status,
text in parts). What locopilot cannot do is refused here with a 400 naming the field:
background mode, conversations, prompt templates, OpenAI's built-in tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from locopilot.api.openai import check_text_size
from locopilot.api.responses_format import new_id
from locopilot.api.tools import ToolParams, check_schema_bounds, check_tools
from locopilot.engine.protocol import sampling_of
from locopilot.errors import InvalidRequest, LocopilotError
from locopilot.providers.base import (
    FunctionTool,
    GenerationRequest,
    ImagePart,
    Message,
    ToolCall,
    ToolChoice,
)
from locopilot.schemas.responses import (
    INPUT_ITEMS,
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionToolSpec,
    InputFilePart,
    InputImagePart,
    InputItem,
    InputTextPart,
    ItemReference,
    JsonObjectTextFormat,
    JsonSchemaTextFormat,
    MessageItem,
    OutputTextPart,
    ReasoningItem,
    RefusalPart,
    ResponsesRequest,
    TextConfig,
)

#: Tool types of OpenAI's that run on OpenAI's side; locopilot runs none of them.
BUILT_IN_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "computer",
        "computer_use",
        "computer_use_preview",
        "code_interpreter",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
        "namespace",
        "tool_search",
        "programmatic_tool_calling",
    }
)


def refused_tool(kind: object, param: str) -> InvalidRequest:
    what = "Built-in tools" if kind in BUILT_IN_TOOLS else "Tools"
    return InvalidRequest(
        f"{what} of type {str(kind)[:64]!r} are not supported: locopilot runs no tools itself "
        "(no web search, file search, computer use, code interpreter, image generation or MCP). "
        'Declare your own tools with "type": "function" and run them in your code.',
        param=param,
        code="unsupported_tool_type",
    )


def _invalid(exc: msgspec.ValidationError, param: str) -> InvalidRequest:
    """A 400 for a decoding error of the item at ``param``, naming the field msgspec names (``$.content``)."""
    message = str(exc)
    where = param
    marker = " - at `$"
    if marker in message:
        message, _, path = message.partition(marker)
        where = param + path.rstrip("`")
    return InvalidRequest(f"Invalid value for '{where}': {message}", param=where)


def decode_item(raw: dict[str, Any], param: str) -> InputItem:
    """One input (or stored) item; an item without ``type`` is a message."""
    kind = raw.get("type", "message")
    item_type = INPUT_ITEMS.get(kind) if isinstance(kind, str) else None
    if item_type is None:
        raise InvalidRequest(
            f"Input items of type {str(kind)[:64]!r} are not supported: use message, function_call, "
            "function_call_output, reasoning or item_reference items.",
            param=f"{param}.type",
        )
    try:
        return msgspec.convert(raw, item_type)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, param) from None


def normalized(item: InputItem) -> MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem:
    """``item`` as it is stored and listed: with an id, a status and its text in parts."""
    match item:
        case MessageItem(role=role, content=str(text)):
            part: ContentPart = OutputTextPart(text) if role == "assistant" else InputTextPart(text)
            return MessageItem(role=role, content=[part], id=item.id or new_id("msg"), status="completed")
        case MessageItem():
            return msgspec.structs.replace(item, id=item.id or new_id("msg"), status=item.status or "completed")
        case FunctionCallItem():
            return msgspec.structs.replace(item, id=item.id or new_id("fc"), status=item.status or "completed")
        case FunctionCallOutputItem():
            return msgspec.structs.replace(item, id=item.id or new_id("fco"), status=item.status or "completed")
        case ReasoningItem():
            return msgspec.structs.replace(item, id=item.id or new_id("rs"))
    raise AssertionError(f"unresolved item {item!r}")  # item references are resolved before


def content_of(content: str | list[ContentPart], param: str, max_text: int) -> tuple[str, tuple[ImagePart, ...]]:
    """The text (parts joined by newlines) and images of a message's or a tool output's content."""
    if isinstance(content, str):
        return check_text_size(content, max_text, param), ()
    texts: list[str] = []
    images: list[ImagePart] = []
    for index, part in enumerate(content):
        match part:
            case InputTextPart(text=text) | OutputTextPart(text=text):
                texts.append(text)
            case RefusalPart(refusal=text):
                texts.append(text)
            case InputImagePart(image_url=str(url), detail=detail):
                images.append(ImagePart(url=url, detail=detail))
            case InputImagePart():
                raise InvalidRequest(
                    "input_image parts need an image_url; file ids are not supported.", param=f"{param}[{index}]"
                )
            case InputFilePart():
                raise InvalidRequest("input_file parts are not supported.", param=f"{param}[{index}]")
    return check_text_size("\n".join(texts), max_text, param), tuple(images)


@dataclass
class Conversation:
    """Chat messages built from items, with the wire index each came from (-1: not from ``input``)."""

    messages: list[Message] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)
    call_names: dict[str, str] = field(default_factory=dict)

    def add(self, message: Message, origin: int) -> None:
        self.messages.append(message)
        self.origin.append(origin)

    def add_item(self, item: InputItem, origin: int, max_text: int) -> None:
        param = f"input[{origin}]" if origin >= 0 else "previous_response_id"
        match item:
            case MessageItem(role=role, content=content):
                text, images = content_of(content, f"{param}.content", max_text)
                self.add(Message(role="system" if role == "developer" else role, content=text, images=images), origin)
            case FunctionCallItem(call_id=call_id, name=name, arguments=arguments):
                self.call_names[call_id] = name
                call = ToolCall(id=call_id, name=name, arguments=arguments)
                last = self.messages[-1] if self.messages else None
                if last is not None and last.role == "assistant":
                    # Calls that follow an assistant message (or each other) are that message's.
                    self.messages[-1] = msgspec.structs.replace(last, tool_calls=(*last.tool_calls, call))
                else:
                    self.add(Message(role="assistant", tool_calls=(call,)), origin)
            case FunctionCallOutputItem(call_id=call_id, output=output):
                text, _ = content_of(output, f"{param}.output", max_text)
                answered = self.call_names.get(call_id)
                self.add(Message(role="tool", content=text, tool_call_id=call_id, name=answered), origin)
            case ReasoningItem():
                pass  # reasoning of another model: accepted, and not shown to this one


def tools_of(specs: list[dict[str, Any]]) -> tuple[list[FunctionToolSpec], tuple[FunctionTool, ...]]:
    """The declared function tools, as echoed in the response and as the generation takes them."""
    echoed: list[FunctionToolSpec] = []
    for index, raw in enumerate(specs):
        kind = raw.get("type")
        if kind != "function":
            raise refused_tool(kind, f"tools[{index}].type")
        try:
            echoed.append(msgspec.convert(raw, FunctionToolSpec))
        except msgspec.ValidationError as exc:
            raise _invalid(exc, f"tools[{index}]") from None
    tools = tuple(
        FunctionTool(name=spec.name, description=spec.description, parameters=spec.parameters, strict=spec.strict)
        if spec.parameters is not None
        else FunctionTool(name=spec.name, description=spec.description, strict=spec.strict)
        for spec in echoed
    )
    return echoed, tools


def tool_choice_of(value: str | dict[str, Any] | None) -> tuple[str | FunctionChoice, ToolChoice]:
    """``tool_choice`` as echoed in the response, and as the generation takes it."""
    match value:
        case None | "auto":
            return "auto", ToolChoice(mode="auto")
        case "none" | "required":
            return value, ToolChoice(mode=value)
        case {"type": "function", "name": str(name)}:
            return FunctionChoice(name), ToolChoice(mode="function", name=name)
        case {"type": str(kind)} if kind != "function":
            raise refused_tool(kind, "tool_choice.type")
    raise InvalidRequest(
        'tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}.', param="tool_choice"
    )


def json_schema_of(text: TextConfig | None) -> str | None:
    match text.format if text is not None else None:
        case JsonSchemaTextFormat(schema=schema):
            check_schema_bounds(schema, "text.format.schema")
            return json.dumps(schema)
        case JsonObjectTextFormat():
            return '{"type": "object"}'
    return None


def refuse_unsupported(body: ResponsesRequest) -> None:
    """The request's fields that ask for what locopilot does not do: each a 400 naming it."""
    if body.background:
        raise InvalidRequest(
            "background mode is not supported: locopilot answers each response while the request is open "
            "(stream it for long answers).",
            param="background",
        )
    if body.conversation is not None:
        raise InvalidRequest(
            "conversation objects are not supported; continue with previous_response_id.", param="conversation"
        )
    if body.prompt is not None:
        raise InvalidRequest("stored prompt templates are not supported; send input instead.", param="prompt")
    if body.top_logprobs:
        raise InvalidRequest("top_logprobs is not supported on /v1/responses.", param="top_logprobs")


@dataclass
class Prepared:
    """What a request needs from the database, read before the generation is built."""

    history: list[dict[str, Any]] = field(default_factory=list)
    """Items of the chain that ``previous_response_id`` continues, oldest first."""
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Stored items that ``item_reference`` input items name, by id."""
    failure: LocopilotError | None = None


@dataclass
class Translated:
    generation: GenerationRequest
    inputs: list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem]
    """This request's input items as stored: references resolved, ids given."""
    tools: list[FunctionToolSpec]
    tool_choice: str | FunctionChoice


def translate(body: ResponsesRequest, prepared: Prepared, max_text: int) -> Translated:
    """The generation ``body`` asks for, continuing ``prepared.history``; InvalidRequest/NotFound if it cannot be."""
    if prepared.failure is not None:
        raise prepared.failure
    refuse_unsupported(body)
    conversation = Conversation()
    if body.instructions:
        conversation.add(
            Message(role="system", content=check_text_size(body.instructions, max_text, "instructions")), -1
        )
    for raw in prepared.history:
        conversation.add_item(decode_item(raw, "previous_response_id"), -1, max_text)
    match body.input:
        case "":
            raws: list[dict[str, Any]] = []
        case str(text):
            raws = [{"role": "user", "content": text}]
        case list(items):
            raws = items
    inputs: list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem] = []
    for index, raw in enumerate(raws):
        param = f"input[{index}]"
        item = decode_item(raw, param)
        if isinstance(item, ItemReference):
            item = decode_item(prepared.references[item.id], param)
        stored = normalized(item)
        inputs.append(stored)
        conversation.add_item(stored, index, max_text)
    if not conversation.messages:
        raise InvalidRequest("input is empty: send text or at least one message.", param="input")
    echoed_tools, tools = tools_of(body.tools)
    echoed_choice, choice = tool_choice_of(body.tool_choice)
    params = ToolParams(
        tool="tools[{}]",
        message="input[{}]",
        message_origin=tuple(conversation.origin),
        call_id="call_id",
        call_arguments="arguments",
    )
    check_tools(tools, choice, conversation.messages, params)
    generation = GenerationRequest(
        model=body.model,
        messages=conversation.messages,
        max_tokens=body.max_output_tokens,
        json_schema=json_schema_of(body.text),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        sampling=sampling_of(temperature=body.temperature, top_p=body.top_p),
    )
    return Translated(generation, inputs, echoed_tools, echoed_choice)
