"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A translator, as every front is: the body becomes one
:class:`~locopilot.providers.base.GenerationRequest` (content blocks → :class:`Message`
with ``tool_calls``, ``tool_call_id`` and ``images``; ``tools``/``tool_choice`` → the
internal tool types) that :func:`~locopilot.api.generation.serve_generation` routes,
limits and records, and :class:`MessagesFormatter` writes the reply back as Anthropic's
``message`` or its stream of named events. Errors take Anthropic's shape in one place
(:func:`locopilot.errors.render`, chosen by the path).

Accepted and ignored: ``cache_control`` (the engine reuses any cached prompt prefix on
its own), ``thinking`` and thinking blocks of earlier turns, ``metadata``, ``service_tier``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.response import Stream

from locopilot.api.generation import privacy_of, provider_headers, route_for, serve_generation
from locopilot.api.openai import check_text_size
from locopilot.api.responses import BODY, GUARDED, ROUTED, answers
from locopilot.api.services import Pipeline
from locopilot.api.tools import ToolParams, check_tools
from locopilot.engine.protocol import sampling_of
from locopilot.errors import InvalidRequest, LocopilotError, render
from locopilot.gateway.access import outcome_id
from locopilot.gateway.auth import principal_of
from locopilot.gateway.failover import first_success
from locopilot.gateway.router import Route
from locopilot.gateway.streaming import Reply, sse, sse_data, unless_disconnected
from locopilot.gateway.usage import Outcome
from locopilot.providers.base import (
    CountsTokens,
    Finish,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    Message,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from locopilot.schemas import anthropic as wire
from locopilot.schemas.anthropic import (
    Base64Source,
    CountTokensRequest,
    DocumentBlock,
    FileSource,
    ImageBlock,
    InputMessage,
    MessagesRequest,
    PromptFields,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UrlSource,
    encoder,
)

#: Anthropic's limit on one image (5 MB decoded); LOCOPILOT_MAX_BODY_BYTES bounds the body first.
MAX_IMAGE_BYTES = 5 * 1024 * 1024


# Request → GenerationRequest


def joined(texts: list[str], limit: int, param: str) -> str:
    return check_text_size("\n".join(texts), limit, param)


def image_part(block: ImageBlock, param: str) -> ImagePart:
    match block.source:
        case Base64Source(media_type=media_type, data=data):
            if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
                raise InvalidRequest(f"{param} is larger than {MAX_IMAGE_BYTES} bytes.", param=param)
            try:
                base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequest(
                    f"{param}.source.data is not valid base64.", param=f"{param}.source.data"
                ) from None
            return ImagePart(url=f"data:{media_type};base64,{data}")
        case FileSource():
            raise InvalidRequest(
                "Image sources of type 'file' (the Files API) are not supported; send the image as base64 or a URL.",
                param=f"{param}.source",
            )
        case UrlSource(url=url):
            return ImagePart(url=url)
    raise AssertionError(block.source)


def tool_result(block: ToolResultBlock, limit: int, param: str) -> Message:
    texts: list[str] = []
    images: list[ImagePart] = []
    match block.content:
        case str(text):
            texts.append(text)
        case parts:
            for k, part in enumerate(parts):
                match part:
                    case TextBlock(text=text):
                        texts.append(text)
                    case ImageBlock():
                        images.append(image_part(part, f"{param}.content[{k}]"))
                    case DocumentBlock():
                        raise InvalidRequest("document blocks are not supported.", param=f"{param}.content[{k}]")
    content = joined(texts, limit, f"{param}.content")
    if block.is_error:
        # OpenAI's tool messages have no error flag: the model reads it in the text.
        content = f"Error: {content}"
    return Message(role="tool", content=content, images=tuple(images), tool_call_id=block.tool_use_id)


def chat_messages(body: PromptFields, limit: int) -> tuple[list[Message], tuple[int, ...]]:
    """``system`` and ``messages`` as internal messages, and the index in ``messages`` each came
    from; tool results become ``tool`` messages (ahead of the user's other content, as
    OpenAI-style chats want them right after the call)."""
    messages: list[Message] = []
    match body.system:
        case str(text) if text:
            messages.append(Message(role="system", content=check_text_size(text, limit, "system")))
        case [*blocks] if blocks:
            messages.append(Message(role="system", content=joined([b.text for b in blocks], limit, "system")))
    origin = [0] * len(messages)
    called: set[str] = set()
    for i, message in enumerate(body.messages):
        translated = translate(i, message, limit, called)
        messages.extend(translated)
        origin.extend([i] * len(translated))
    return messages, tuple(origin)


def translate(i: int, message: InputMessage, limit: int, called: set[str]) -> list[Message]:
    """Message ``i`` as internal messages; ``called`` collects the tool_use ids seen so far."""
    param = f"messages[{i}].content"
    if isinstance(message.content, str):
        return [Message(role=message.role, content=check_text_size(message.content, limit, param))]
    texts: list[str] = []
    images: list[ImagePart] = []
    calls: list[ToolCall] = []
    results: list[Message] = []
    for j, block in enumerate(message.content):
        where = f"{param}[{j}]"
        match block:
            case TextBlock(text=text):
                texts.append(text)
            case ThinkingBlock() | RedactedThinkingBlock():
                pass
            case ImageBlock() if message.role == "user":
                images.append(image_part(block, where))
            case ToolUseBlock(id=call_id, name=name, input=arguments) if message.role == "assistant":
                calls.append(ToolCall(id=call_id, name=name, arguments=json.dumps(arguments)))
                called.add(call_id)
            case ToolResultBlock() if message.role == "user":
                if block.tool_use_id not in called:
                    raise InvalidRequest(
                        f"{where}.tool_use_id names no tool_use block of an earlier assistant message.",
                        param=f"{where}.tool_use_id",
                    )
                results.append(tool_result(block, limit, where))
            case DocumentBlock():
                raise InvalidRequest("document blocks are not supported.", param=where)
            case _:
                kind = block.__struct_config__.tag
                raise InvalidRequest(f"A {message.role} message may not hold a '{kind}' block.", param=where)
    out = results
    if texts or images or calls or not results:
        content = joined(texts, limit, param)
        out.append(Message(role=message.role, content=content, images=tuple(images), tool_calls=tuple(calls)))
    return out


ANTHROPIC_TOOLS = ToolParams(tool="tools[{}]", tool_choice="tool_choice", message="messages[{}]")


def function_tools(body: PromptFields) -> tuple[tuple[FunctionTool, ...], ToolChoice, bool]:
    """The tools, the tool choice and whether calls may be parallel (checked with the messages
    by :func:`locopilot.api.tools.check_tools` in :func:`prompt_generation`)."""
    tools: list[FunctionTool] = []
    for i, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise InvalidRequest(
                f"Server tools ({tool.type!r}) are not supported; only client tools with an input_schema.",
                param=f"tools[{i}].type",
            )
        if tool.input_schema is None:
            raise InvalidRequest("A tool needs an input_schema.", param=f"tools[{i}].input_schema")
        if tool.input_schema.get("type") != "object":
            raise InvalidRequest(
                'A tool\'s input_schema must be a JSON Schema with "type": "object".', param=f"tools[{i}].input_schema"
            )
        tools.append(FunctionTool(name=tool.name, description=tool.description, parameters=tool.input_schema))
    match body.tool_choice:
        case wire.ToolChoiceNone():
            choice = ToolChoice(mode="none")
        case wire.ToolChoiceAny():
            choice = ToolChoice(mode="required")
        case wire.ToolChoiceTool(name=name):
            choice = ToolChoice(mode="function", name=name)
        case _:
            choice = ToolChoice(mode="auto")
    parallel = True
    if isinstance(body.tool_choice, wire.ToolChoiceAuto | wire.ToolChoiceAny | wire.ToolChoiceTool):
        parallel = not body.tool_choice.disable_parallel_tool_use
    return tuple(tools), choice, parallel


def prompt_generation(body: PromptFields, max_text: int) -> GenerationRequest:
    """The prompt ``body`` describes, as a generation of nothing yet (what count_tokens counts)."""
    tools, choice, parallel = function_tools(body)
    messages, origin = chat_messages(body, max_text)
    check_tools(tools, choice, messages, dataclasses.replace(ANTHROPIC_TOOLS, message_origin=origin))
    return GenerationRequest(
        model=body.model,
        messages=messages,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )


def messages_generation(body: MessagesRequest, max_text: int) -> GenerationRequest:
    """The generation ``body`` asks for; ``max_text`` bounds each message's text in bytes."""
    sampling = sampling_of(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
    return msgspec.structs.replace(
        prompt_generation(body, max_text),
        max_tokens=body.max_tokens,
        stop=list(body.stop_sequences or []),
        sampling=sampling,
    )


# Reply → Anthropic's wire form


def message_id(request_id: str) -> str:
    """Anthropic's ``msg_…`` id for the request id (``msg-<hex>``, or the client's X-Request-Id)."""
    return "msg_" + request_id.removeprefix("msg-")


def tool_input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's ``input`` is (providers send only parsable calls)."""
    try:
        value = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise LocopilotError(f"the provider sent tool call arguments that are not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise LocopilotError("the provider sent tool call arguments that are not a JSON object")
    return value


class MessagesFormatter:
    """One reply as Anthropic's ``message``, or as its event stream: ``message_start`` and a
    ``ping``; for each content block ``content_block_start``, its deltas (``text_delta``,
    ``input_json_delta``) and ``content_block_stop``; then ``message_delta`` with the stop
    reason and the usage, and ``message_stop``. A failure after the first byte is an
    ``error`` event in Anthropic's error shape.

    ``stop_sequence``: when the engine says which stop string ended the reply
    (:attr:`Finish.stop`) and it is one of the request's, the stop reason is
    ``stop_sequence`` and it is named; otherwise ``end_turn``.
    """

    media_type = "text/event-stream"

    def __init__(self, request_id: str, model: str, stop_sequences: list[str]) -> None:
        self.id = message_id(request_id)
        self.model = model
        self.stop_sequences = stop_sequences
        self.block = -1  # index of the open content block; -1 before the first
        self.open_call: int | None = None  # the tool call the open block holds; None for a text block
        self.calls = 0

    def _stop(self, finish: Finish, calls: int) -> tuple[wire.StopReason, str | None]:
        if finish.reason == "length":
            return "max_tokens", None
        if finish.reason == "tool_calls" or calls:
            return "tool_use", None
        if finish.stop is not None and finish.stop in self.stop_sequences:
            return "stop_sequence", finish.stop
        return "end_turn", None

    @staticmethod
    def _usage(finish: Finish) -> wire.Usage:
        return wire.Usage(
            input_tokens=finish.prompt_tokens - finish.cached_tokens,
            output_tokens=finish.completion_tokens,
            cache_read_input_tokens=finish.cached_tokens,
        )

    # Streamed

    def opening(self) -> bytes:
        start = wire.MessageResponse(
            id=self.id,
            model=self.model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=wire.Usage(input_tokens=0, output_tokens=0),
        )
        return sse(wire.MessageStart(start), "message_start") + sse(wire.Ping(), "ping")

    def _close(self) -> bytes:
        return sse(wire.ContentBlockStop(self.block), "content_block_stop") if self.block >= 0 else b""

    def event(self, delta: TextDelta | ToolCallDelta) -> bytes:
        out = b""
        if isinstance(delta, TextDelta):
            if not delta.text:
                return b""
            if self.block < 0 or self.open_call is not None:
                out += self._close()
                self.block += 1
                self.open_call = None
                out += sse(wire.ContentBlockStart(self.block, wire.TextContent("")), "content_block_start")
            return out + sse(wire.ContentBlockDelta(self.block, wire.TextDelta(delta.text)), "content_block_delta")
        if self.open_call != delta.call or self.block < 0:
            out += self._close()
            self.block += 1
            self.open_call = delta.call
            self.calls += 1
            block = wire.ToolUseContent(delta.id or f"toolu_{self.id[4:]}_{delta.call}", delta.name or "", {})
            out += sse(wire.ContentBlockStart(self.block, block), "content_block_start")
        if delta.arguments:
            partial = wire.InputJsonDelta(delta.arguments)
            out += sse(wire.ContentBlockDelta(self.block, partial), "content_block_delta")
        return out

    def closing(self, finish: Finish) -> bytes:
        reason, sequence = self._stop(finish, self.calls)
        message_delta = wire.MessageDelta(wire.StopDelta(reason, sequence), self._usage(finish))
        return self._close() + sse(message_delta, "message_delta") + sse(wire.MessageStop(), "message_stop")

    def failure(self, error: LocopilotError) -> bytes:
        _, body = render(error, "anthropic")
        return sse_data(body, "error")

    # Whole

    def whole(self, reply: Reply) -> wire.MessageResponse:
        assert reply.finish is not None
        choice = reply.choices[0]
        content: list[wire.ResponseBlock] = []
        if choice.content:
            content.append(wire.TextContent(choice.content))
        calls = choice.tool_calls()
        for n, call in enumerate(calls):
            content.append(wire.ToolUseContent(call.id or f"toolu_{self.id[4:]}_{n}", call.name, tool_input(call)))
        reason, sequence = self._stop(reply.finish, len(calls))
        return wire.MessageResponse(
            id=self.id,
            model=self.model,
            content=content,
            stop_reason=reason,
            stop_sequence=sequence,
            usage=self._usage(reply.finish),
        )


# Routes


@post(
    "/v1/messages",
    status_code=200,
    responses=answers(wire.MessageResponse, 200, *GUARDED, *BODY, *ROUTED, front="anthropic"),
)
async def messages(
    data: MessagesRequest, pipeline: Pipeline, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    return await serve_generation(
        pipeline,
        request,
        endpoint="messages",
        id_prefix="msg",
        model=data.model,
        stream=data.stream,
        build=lambda: messages_generation(data, pipeline.settings.max_message_bytes),
        formatter=lambda request_id: MessagesFormatter(request_id, data.model, list(data.stop_sequences or [])),
    )


@post(
    "/v1/messages/count_tokens",
    status_code=200,
    responses=answers(wire.TokenCount, 200, *GUARDED, *BODY, *ROUTED, front="anthropic"),
)
async def count_tokens(
    data: CountTokensRequest, pipeline: Pipeline, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """The prompt's tokens as the model sees them (its chat template and tokenizer), counted by
    a provider that can: the embedded engine. A model served only by upstreams is refused
    (400): OpenAI-compatible servers have no way to count a chat prompt, and an estimate
    would be a number that means nothing to the model."""
    principal = principal_of(request)
    outcome = Outcome(outcome_id(request.scope, "count"), "messages.count_tokens", data.model, key_id=principal.key_id)
    async with pipeline.recorder.recording(outcome):
        admission = outcome.admission = pipeline.limiter.admit(principal)
        generation = prompt_generation(data, pipeline.settings.max_message_bytes)
        policy = privacy_of(request, pipeline.settings.routing_privacy)
        plan = await route_for(pipeline, request, data.model, policy)
        outcome.routing = plan.decision
        counters = [route for route in plan.routes if isinstance(route.provider, CountsTokens)]
        if not counters:
            served_by = ", ".join(route.provider.name for route in plan.routes)
            raise InvalidRequest(
                f"Tokens can be counted only for models the embedded engine serves; '{data.model}' is served "
                f"by {served_by}.",
                param="model",
            )
        plan.routes = counters

        async def attempt(route: Route) -> int:
            assert isinstance(route.provider, CountsTokens)
            return await route.provider.count_tokens(msgspec.structs.replace(generation, model=route.model))

        route, tokens = await unless_disconnected(
            request.receive, lambda: first_success(pipeline.router, plan, attempt), pipeline.shutdown
        )
        outcome.model, outcome.provider = route.model, route.provider.name
    await pipeline.recorder.settle(outcome)
    return Response(
        encoder.encode(wire.TokenCount(tokens)),
        media_type="application/json",
        headers={**provider_headers(route.provider.name, route.model), **admission.headers()},
    )


ROUTES = [messages, count_tokens]
