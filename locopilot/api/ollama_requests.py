"""Ollama's ``/api/chat`` and ``/api/generate`` bodies as one GenerationRequest, checked before any work.

``options`` become the sampling parameters and the token budget; ``format`` (``"json"``
or a JSON schema) the grammar path's JSON Schema; messages, images and tools the
internal chat types, with tools checked by :func:`~locopilot.api.tools.check_tools`.
Every refusal is an InvalidRequest (400) naming Ollama's field.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from locopilot.api.openai import check_text_size
from locopilot.api.tools import ToolParams, check_schema_bounds, check_tools
from locopilot.engine.protocol import SamplingParams, sampling_of
from locopilot.errors import InvalidRequest
from locopilot.providers.base import FunctionTool, GenerationRequest, ImagePart, Message, ToolCall, ToolChoice
from locopilot.schemas.ollama import (
    ChatMessage,
    ChatRequest,
    GenerateRequest,
    GenerationFields,
    KeepAlive,
    Options,
)
from locopilot.schemas.ollama import ToolCall as OllamaToolCall

#: Ollama's tool results name no call: they answer the call of their tool (see chat_messages).
OLLAMA_TOOLS = ToolParams(call_ids=False)
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# The first bytes of base64 images, for the data: URL a provider that can see expects.
_IMAGE_TYPES = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lGOD": "image/gif", "UklGR": "image/webp"}


def keep_alive_seconds(value: KeepAlive | None) -> float | None:
    """Ollama's ``keep_alive`` in seconds (negative: keep loaded), or None when not sent.

    A number is seconds; a string is a number of seconds or a Go duration (``5m``, ``1h30m``, ``0``).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequest("keep_alive must be a duration such as '5m' or a number of seconds", param="keep_alive")
    if isinstance(value, int | float):
        return -1.0 if value < 0 else float(value)
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _GO_DURATION.findall(body)
        if not body or "".join(number + unit for number, unit in parts) != body:
            raise InvalidRequest(f'time: invalid duration "{value}"', param="keep_alive") from None
        seconds = sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    return -1.0 if seconds < 0 else seconds


def json_schema_of(format: str | dict[str, Any] | None) -> str | None:
    """``format`` as the JSON Schema text of the grammar path: ``"json"`` is any object."""
    match format:
        case None | "":
            return None
        case "json":
            return '{"type": "object"}'
        case dict(schema):
            check_schema_bounds(schema, "format", "format's JSON schema")
            return json.dumps(schema)
        case _:
            raise InvalidRequest('invalid format: expected "json" or a valid JSON schema', param="format")


def options_sampling(options: Options | None) -> SamplingParams:
    """The sampling Ollama's ``options`` ask for; what they leave out keeps the default."""
    if options is None:
        return SamplingParams()
    return sampling_of(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repeat_penalty=options.repeat_penalty,
        seed=None if options.seed is None or options.seed < 0 else options.seed,
    )


def max_tokens_of(options: Options | None) -> int | None:
    """``num_predict``: 0 or negative (Ollama's -1 and -2) generate until the model stops or the context is full."""
    if options is None or options.num_predict is None or options.num_predict <= 0:
        return None
    return options.num_predict


def think_of(body: GenerationFields) -> bool | Literal["low", "medium", "high", "max"] | None:
    """``think`` as Ollama reads it: a boolean or an effort. Whether the model can think is the
    provider's to say (only an Ollama upstream can pass it on; the others refuse it)."""
    match body.think:
        case None:
            return None
        case bool(flag):
            return flag
        case "low" | "medium" | "high" | "max" as level:
            return level
        case other:
            raise InvalidRequest(
                f'invalid think value: "{other}" (must be "high", "medium", "low", "max", true, or false)',
                param="think",
            )


def logprobs_of(body: GenerationFields) -> int | None:
    """How many alternatives beside each token's own logprob (0-20); None when ``logprobs`` is
    not asked for (``top_logprobs`` alone asks for nothing, as in Ollama)."""
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise InvalidRequest("top_logprobs must be between 0 and 20", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def check_num_ctx(options: Options | None, context: int | None) -> None:
    """A ``num_ctx`` above the context the model is loaded with is refused: nothing is cut silently."""
    if options is not None and options.num_ctx is not None and context is not None and options.num_ctx > context:
        raise InvalidRequest(
            f"num_ctx {options.num_ctx} is larger than the {context} tokens this model is loaded with "
            "(LOCOPILOT_CTX_SIZE); locopilot does not resize a model's context per request",
            param="options.num_ctx",
        )


def image_parts(images: list[str] | None, param: str) -> tuple[ImagePart, ...]:
    parts = []
    for index, data in enumerate(images or []):
        kind = next((kind for prefix, kind in _IMAGE_TYPES.items() if data.startswith(prefix)), None)
        if kind is None:
            raise InvalidRequest(f"{param}[{index}] is not a base64 PNG, JPEG, GIF or WebP image", param=param)
        parts.append(ImagePart(url=f"data:{kind};base64,{data}"))
    return tuple(parts)


def chat_messages(messages: list[ChatMessage], limit: int) -> list[Message]:
    """Ollama's messages as the internal ones. A tool result names its tool (``tool_name``), not a call:
    it answers the earliest call to that tool (or, unnamed, the earliest call) not answered yet."""
    result: list[Message] = []
    unanswered: list[ToolCall] = []
    for index, message in enumerate(messages):
        content = check_text_size(message.content, limit, f"messages[{index}].content")
        images = image_parts(message.images, f"messages[{index}].images")
        match message.role:
            case "assistant":
                calls = tuple(
                    ToolCall(id=call.id or f"call_{index}_{n}", name=call.function.name, arguments=arguments(call))
                    for n, call in enumerate(message.tool_calls or [])
                )
                unanswered = list(calls)
                result.append(Message(role="assistant", content=content, images=images, tool_calls=calls))
            case "tool":
                answered = next((c for c in unanswered if c.name == message.tool_name), None)
                if answered is None and message.tool_name is None and unanswered:
                    answered = unanswered[0]
                if answered is not None:
                    unanswered.remove(answered)
                call_id = answered.id if answered is not None else None
                result.append(Message(role="tool", content=content, tool_call_id=call_id, name=message.tool_name))
            case role:
                result.append(Message(role=role, content=content, images=images))
    return result


def arguments(call: OllamaToolCall) -> str:
    return json.dumps(call.function.arguments)


def chat_generation(body: ChatRequest, max_text: int, context: int | None) -> GenerationRequest:
    think, logprobs = think_of(body), logprobs_of(body)
    check_num_ctx(body.options, context)
    tools = tuple(
        FunctionTool(name=tool.function.name, description=tool.function.description)
        if tool.function.parameters is None
        else FunctionTool(
            name=tool.function.name, description=tool.function.description, parameters=tool.function.parameters
        )
        for tool in body.tools or []
    )
    messages = chat_messages(body.messages, max_text)
    choice = ToolChoice(mode="auto")
    check_tools(tools, choice, messages, OLLAMA_TOOLS)
    return GenerationRequest(
        model=body.model,
        messages=messages,
        max_tokens=max_tokens_of(body.options),
        stop=list(body.options.stop or []) if body.options else [],
        json_schema=json_schema_of(body.format),
        tools=tools,
        tool_choice=choice,
        sampling=options_sampling(body.options),
        logprobs=logprobs,
        think=think,
    )


def generate_generation(body: GenerateRequest, max_text: int, context: int | None) -> GenerationRequest:
    """``raw`` sends the prompt as it is; ``suffix`` asks for the text between prompt and suffix
    (fill-in-the-middle); otherwise the prompt (after ``system``) goes through the chat template."""
    think, logprobs = think_of(body), logprobs_of(body)
    check_num_ctx(body.options, context)
    if body.template is not None:
        raise InvalidRequest(
            "template is not supported: locopilot applies the model's own chat template, or none with raw",
            param="template",
        )
    if body.context is not None:
        raise InvalidRequest(
            "context is not supported (Ollama deprecated it): send the conversation to /api/chat as messages",
            param="context",
        )
    prompt = check_text_size(body.prompt, max_text, "prompt")
    common: dict[str, Any] = {
        "model": body.model,
        "max_tokens": max_tokens_of(body.options),
        "stop": list(body.options.stop or []) if body.options else [],
        "json_schema": json_schema_of(body.format),
        "sampling": options_sampling(body.options),
        "logprobs": logprobs,
        "think": think,
    }
    if body.raw or body.suffix:
        if body.system:
            raise InvalidRequest("raw mode and suffix do not support system", param="system")
        if body.images:
            raise InvalidRequest("raw mode and suffix do not support images", param="images")
        suffix = check_text_size(body.suffix, max_text, "suffix") if body.suffix else None
        return GenerationRequest(prompt=prompt, suffix=suffix, **common)
    messages = [Message(role="system", content=check_text_size(body.system, max_text, "system"))] if body.system else []
    messages.append(Message(role="user", content=prompt, images=image_parts(body.images, "images")))
    return GenerationRequest(messages=messages, **common)
