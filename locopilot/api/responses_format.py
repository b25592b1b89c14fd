"""The Responses API's wire form of a reply: a Response object, or its event stream.

Streamed, a reply is ``response.created`` and ``response.in_progress``, then its output
items in order, each opened (``response.output_item.added``; for a message also
``response.content_part.added``), filled (``response.output_text.delta`` or
``response.function_call_arguments.delta``) and closed (``.done`` events, then
``response.output_item.done``), and last ``response.completed`` (``response.incomplete``
when the token limit cut it short) with the whole response. Text starts a message item and
each tool call a ``function_call`` item, in the order the model produced them. Every event
carries ``sequence_number`` (0, 1, ...) and goes out as ``event: <type>`` and ``data:``
lines. An error after the first byte is an ``error`` event followed by ``response.failed``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from locopilot.errors import LocopilotError
from locopilot.gateway.streaming import Reply, sse
from locopilot.providers.base import Finish, TextDelta, ToolCallDelta
from locopilot.schemas.responses import (
    ArgumentsDelta,
    ArgumentsDone,
    Completed,
    ContentPart,
    ContentPartAdded,
    ContentPartDone,
    Created,
    ErrorEvent,
    Failed,
    FunctionCallItem,
    Incomplete,
    IncompleteDetails,
    InProgress,
    InputTokensDetails,
    MessageItem,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputTextDelta,
    OutputTextDone,
    OutputTextPart,
    OutputTokensDetails,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponseUsage,
)

ItemStatus = Literal["in_progress", "completed", "incomplete"]


def new_id(prefix: str) -> str:
    """A new object id in OpenAI's form (``resp_…``, ``msg_…``, ``fc_…``)."""
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass
class _Item:
    """One output item as its parts arrive; ``announced`` once its opening events went out."""

    index: int
    kind: Literal["message", "function_call"]
    id: str
    call: int = -1  # the ToolCallDelta.call this item holds
    call_id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)  # text, or arguments
    announced: bool = False
    done: bool = False

    @property
    def content(self) -> str:
        return "".join(self.parts)

    def wire(self, status: ItemStatus) -> OutputItem:
        if self.kind == "message":
            content: list[ContentPart] = [OutputTextPart(self.content)] if status != "in_progress" else []
            return MessageItem(role="assistant", content=content, id=self.id, status=status)
        arguments = self.content if status != "in_progress" else ""
        return FunctionCallItem(call_id=self.call_id, name=self.name, arguments=arguments, id=self.id, status=status)


class ResponsesFormatter:
    """One response's wire form (see the module docstring). Made per request from the
    ``in_progress`` response that the handler built; :meth:`final` is the finished response,
    the same object the stream's last event carries and the store keeps."""

    media_type = "text/event-stream"

    def __init__(self, skeleton: ResponseObject) -> None:
        self.skeleton = skeleton
        self.items: list[_Item] = []
        self.streamed = False
        self._sequence = 0
        self._final: ResponseObject | None = None

    # Events

    def _send(self, make: type[ResponseEvent], **fields: object) -> bytes:
        event = make(sequence_number=self._sequence, **fields)
        self._sequence += 1
        kind: str = type(event).__struct_config__.tag  # type: ignore[assignment]
        return sse(event, kind)

    def opening(self) -> bytes:
        self.streamed = True
        return self._send(Created, response=self.skeleton) + self._send(InProgress, response=self.skeleton)

    def event(self, event: TextDelta | ToolCallDelta) -> bytes:
        if event.index != 0:
            return b""  # one choice only: the Responses API has no n
        out = b""
        current = self.items[-1] if self.items else None
        match event:
            case TextDelta(text=text):
                if not text:
                    return b""
                if current is None or current.kind != "message":
                    out += self._close_open()
                    current = self._add("message", new_id("msg"))
                    out += self._announce(current)
                current.parts.append(text)
                out += self._send(
                    OutputTextDelta, item_id=current.id, output_index=current.index, content_index=0, delta=text
                )
            case ToolCallDelta(call=call, id=call_id, name=name, arguments=arguments):
                if current is None or current.kind != "function_call" or current.call != call:
                    out += self._close_open()
                    current = self._add("function_call", new_id("fc"))
                    current.call, current.call_id, current.name = call, call_id or new_id("call"), name or ""
                    out += self._announce(current)
                if arguments:
                    current.parts.append(arguments)
                    out += self._send(ArgumentsDelta, item_id=current.id, output_index=current.index, delta=arguments)
        return out

    def closing(self, finish: Finish) -> bytes:
        final = self._finish(finish)
        out = b""
        for item, wire in zip(self.items, final.output, strict=True):
            if not item.announced:
                out += self._announce(item)
            if not item.done:
                out += self._close(item, wire)
        if final.status == "incomplete":
            return out + self._send(Incomplete, response=final)
        return out + self._send(Completed, response=final)

    def failure(self, error: LocopilotError) -> bytes:
        code = error.code or error.error_type
        out = self._send(ErrorEvent, message=error.message, code=code, param=error.param)
        failed = msgspec.structs.replace(
            self.skeleton,
            status="failed",
            error=ResponseError(code="server_error", message=error.message),
            output=[item.wire("incomplete") for item in self.items],
        )
        return out + self._send(Failed, response=failed)

    def whole(self, reply: Reply) -> ResponseObject:
        return self.final(reply)

    # Items

    def _add(self, kind: Literal["message", "function_call"], item_id: str) -> _Item:
        item = _Item(len(self.items), kind, item_id)
        self.items.append(item)
        return item

    def _announce(self, item: _Item) -> bytes:
        item.announced = True
        out = self._send(OutputItemAdded, output_index=item.index, item=item.wire("in_progress"))
        if item.kind == "message":
            part = OutputTextPart("")
            out += self._send(ContentPartAdded, item_id=item.id, output_index=item.index, content_index=0, part=part)
        return out

    def _close_open(self) -> bytes:
        """Close the last item, which the next one follows: it is complete."""
        if not self.items or self.items[-1].done:
            return b""
        item = self.items[-1]
        return self._close(item, item.wire("completed"))

    def _close(self, item: _Item, wire: OutputItem) -> bytes:
        item.done = True
        out = b""
        where = {"item_id": item.id, "output_index": item.index}
        if isinstance(wire, MessageItem):
            text = item.content
            out += self._send(OutputTextDone, **where, content_index=0, text=text)
            out += self._send(ContentPartDone, **where, content_index=0, part=OutputTextPart(text))
        else:
            out += self._send(ArgumentsDone, **where, arguments=item.content, name=item.name)
        return out + self._send(OutputItemDone, output_index=item.index, item=wire)

    # The finished response

    def final(self, reply: Reply) -> ResponseObject:
        """The finished response for ``reply`` (memoized: the store and the wire get the same ids)."""
        assert reply.finish is not None
        if not self.streamed and not self.items:
            choice = reply.choices[0]
            calls = choice.tool_calls()
            if choice.content or not calls:
                self._add("message", new_id("msg")).parts.append(choice.content)
            for number, call in enumerate(calls):
                item = self._add("function_call", new_id("fc"))
                item.call, item.call_id, item.name = number, call.id or new_id("call"), call.name
                item.parts.append(call.arguments)
        return self._finish(reply.finish)

    def _finish(self, finish: Finish) -> ResponseObject:
        if self._final is not None:
            return self._final
        if not self.items:
            self._add("message", new_id("msg"))  # an empty answer is an empty message
        cut = finish.reason == "length"
        last = len(self.items) - 1
        output = [item.wire("incomplete" if cut and item.index == last else "completed") for item in self.items]
        usage = ResponseUsage(
            input_tokens=finish.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=finish.cached_tokens),
            output_tokens=finish.completion_tokens,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=finish.prompt_tokens + finish.completion_tokens,
        )
        self._final = msgspec.structs.replace(
            self.skeleton,
            status="incomplete" if cut else "completed",
            output=output,
            usage=usage,
            incomplete_details=IncompleteDetails("max_output_tokens") if cut else None,
            completed_at=None if cut else int(time.time()),
        )
        return self._final
