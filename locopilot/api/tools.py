"""Checks every front makes of tools, tool choice and tool messages, before any work.

Each front (OpenAI chat, Responses, Anthropic, Ollama) translates its body into the
internal :class:`~locopilot.providers.base.Message`, :class:`FunctionTool` and
:class:`ToolChoice` and calls :func:`check_tools`; a :class:`ToolParams` names the
front's own fields in the ``param`` of the :class:`InvalidRequest` (400) it raises.
:func:`check_schema_bounds` bounds any JSON Schema that will be compiled into a
grammar (tool parameters, ``response_format``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from locopilot.errors import InvalidRequest
from locopilot.providers.base import FunctionTool, Message, ToolChoice

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
"""OpenAI's rule for function names (``^[a-zA-Z0-9_-]{1,64}$``)."""
MAX_TOOLS = 128  # OpenAI's limit

SCHEMA_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
MAX_SCHEMA_COUNT = 4096
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 48  # JSON nesting levels: an object property is two (its object, properties)
MAX_TOOLS_BYTES = 4 * MAX_SCHEMA_BYTES  # all tools' schemas together become one grammar


def check_schema_bounds(schema: dict[str, object], param: str, what: str = "json_schema") -> None:
    """Refuse schemas whose grammar would be huge: a ``minLength`` of 10^8 is a 500 MB grammar.

    ``param`` names the field in the 400; ``what`` is how the message calls the schema.
    """
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"{what} is larger than {MAX_SCHEMA_BYTES} bytes.", param=param)
    stack: list[tuple[object, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(f"{what} is nested more than {MAX_SCHEMA_DEPTH} levels deep.", param=param)
        if isinstance(node, dict):
            for key, value in node.items():
                if key in SCHEMA_COUNT_KEYS and isinstance(value, int | float) and value > MAX_SCHEMA_COUNT:
                    raise InvalidRequest(f"{what} {key} of {value} exceeds {MAX_SCHEMA_COUNT}.", param=param)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)


@dataclass(frozen=True)
class ToolParams:
    """How one front names the fields :func:`check_tools` may blame.

    ``tool`` is the wire path of a tool's function, ``{}`` standing for its index
    (``tools[{}].function`` on OpenAI chat, ``tools[{}]`` on Anthropic and Responses);
    ``message`` that of a message. ``message_origin``, when given, holds the wire index
    of each internal message, for fronts whose messages do not map one to one (a system
    field that became message 0, items that became several messages). ``call_ids`` says
    whether tool messages must name the call they answer (Ollama's carry no ids).
    """

    tool: str = "tools[{}].function"
    tool_choice: str = "tool_choice"
    message: str = "messages[{}]"
    message_origin: tuple[int, ...] = ()
    call_ids: bool = True

    def tool_param(self, index: int) -> str:
        return self.tool.format(index)

    def message_param(self, index: int) -> str:
        origin = self.message_origin
        return self.message.format(origin[index] if index < len(origin) else index)


OPENAI_CHAT = ToolParams()


def check_tools(
    tools: Sequence[FunctionTool],
    choice: ToolChoice,
    messages: Sequence[Message],
    params: ToolParams = OPENAI_CHAT,
) -> None:
    """Raise InvalidRequest (400, with ``param``) for the first thing wrong with ``tools``,
    ``choice`` or the tool calls and results in ``messages``."""
    _check_declared(tools, params)
    _check_choice(tools, choice, params)
    _check_history(messages, params)


def _check_declared(tools: Sequence[FunctionTool], params: ToolParams) -> None:
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"At most {MAX_TOOLS} tools may be declared, got {len(tools)}.", param="tools")
    seen: set[str] = set()
    total = 0
    for index, tool in enumerate(tools):
        where = params.tool_param(index)
        if not tool.name:
            raise InvalidRequest("A tool needs a name.", param=f"{where}.name")
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidRequest(
                f"Invalid tool name {tool.name[:80]!r}: use 1 to 64 letters, digits, '_' or '-'.",
                param=f"{where}.name",
            )
        if tool.name in seen:
            raise InvalidRequest(f"Tool name {tool.name!r} is declared twice.", param=f"{where}.name")
        seen.add(tool.name)
        schema = tool.parameters
        param = f"{where}.parameters"
        # {} is a function without arguments, as OpenAI takes it.
        if schema and schema.get("type") != "object":
            raise InvalidRequest(
                f'The parameters of tool {tool.name!r} must be a JSON Schema with "type": "object".', param=param
            )
        check_schema_bounds(schema, param, f"The parameters schema of tool {tool.name!r}")
        total += len(json.dumps(schema))
        if total > MAX_TOOLS_BYTES:
            raise InvalidRequest(f"The tools' parameter schemas are larger than {MAX_TOOLS_BYTES} bytes.", param=param)


def _check_choice(tools: Sequence[FunctionTool], choice: ToolChoice, params: ToolParams) -> None:
    if choice.mode in ("required", "function") and not tools:
        wanted = "required" if choice.mode == "required" else f"the function {choice.name!r}"
        raise InvalidRequest(f"tool_choice is {wanted} but no tools are declared.", param=params.tool_choice)
    if choice.mode == "function" and choice.name not in {tool.name for tool in tools}:
        raise InvalidRequest(
            f"tool_choice names the function {choice.name!r}, which is not among the declared tools.",
            param=params.tool_choice,
        )


def _check_history(messages: Sequence[Message], params: ToolParams) -> None:
    """Assistant calls carry JSON object arguments; each tool result answers an earlier call."""
    calls: set[str] = set()
    for index, message in enumerate(messages):
        where = params.message_param(index)
        for number, call in enumerate(message.tool_calls):
            if not call.name:
                raise InvalidRequest("A tool call needs a function name.", param=f"{where}.tool_calls[{number}]")
            if not _is_object_text(call.arguments):
                raise InvalidRequest(
                    f"The arguments of tool call {call.id!r} must be the JSON text of an object.",
                    param=f"{where}.tool_calls[{number}].function.arguments",
                )
            if call.id:
                calls.add(call.id)
        if message.role != "tool":
            continue
        if message.tool_call_id is None:
            if params.call_ids:
                raise InvalidRequest("A tool message needs the tool_call_id it answers.", param=f"{where}.tool_call_id")
        elif message.tool_call_id not in calls:
            raise InvalidRequest(
                f"The tool message answers {message.tool_call_id[:80]!r}, which is no earlier assistant tool call.",
                param=f"{where}.tool_call_id",
            )


def _is_object_text(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
