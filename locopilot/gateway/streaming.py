"""Primed streaming: turn a provider's event stream into an HTTP response.

The first event is pulled before any status is sent, so an error before the
first token is a real HTTP error (and, with several providers, failover is
still possible). After the first byte, an error becomes an SSE ``error`` event
and the stream ends. A client that disconnects at any point cancels the work:
while the response is being prepared, :func:`unless_disconnected` watches for
it; once streaming, :class:`_WatchedBody` does. Either way the request's outcome
is recorded once. The same watchers end the work when the shutdown grace is over
(:mod:`locopilot.gateway.shutdown`): a 503 before the first byte, an SSE error
event after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import anyio
import msgspec
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from locopilot.errors import ClientDisconnected, LocopilotError
from locopilot.gateway.shutdown import Shutdown
from locopilot.gateway.usage import Outcome, UsageRecorder
from locopilot.providers.base import Finish, StreamEvent, TextDelta, TokenLogprob, ToolCall, ToolCallDelta
from locopilot.schemas.openai import PromptTokensDetails, Usage, encoder

log = logging.getLogger(__name__)

T = TypeVar("T")
WATCH_AFTER = 0.05
"""Seconds into a response before :class:`Watched` starts listening for the client's disconnect."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Formatter(Protocol):
    """One API's wire form of a reply (OpenAI chat or completions, Anthropic, Ollama, Responses).

    Streamed: :meth:`opening`, then :meth:`event` for each event, then :meth:`closing`
    (or :meth:`failure` for an error after the first byte); each returns the bytes to
    send, possibly none. Whole: :meth:`whole` of the collected :class:`Reply`. A
    formatter is made per request and may keep state (sequence numbers, open blocks).
    """

    media_type: str
    """Of the streamed body: ``text/event-stream`` or ``application/x-ndjson``."""

    def opening(self) -> bytes:
        """Bytes before the first event (a chat's role chunk), or none."""
        ...

    def event(self, event: TextDelta | ToolCallDelta) -> bytes: ...

    def closing(self, finish: Finish) -> bytes:
        """The last bytes: finish reasons, usage, the end marker."""
        ...

    def failure(self, error: LocopilotError) -> bytes:
        """The error event that ends a stream after its first byte."""
        ...

    def whole(self, reply: Reply) -> msgspec.Struct:
        """The body of a non-streaming answer."""
        ...


@dataclass
class CallParts:
    """One tool call as its parts arrive."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def call(self) -> ToolCall:
        return ToolCall(id=self.id, name=self.name, arguments="".join(self.arguments))


@dataclass
class ChoiceParts:
    """One choice of a reply as its events arrive."""

    text: list[str] = field(default_factory=list)
    calls: list[CallParts] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(self.text)

    @property
    def reasoning(self) -> str:
        return "".join(self.thinking)

    def tool_calls(self) -> list[ToolCall]:
        return [parts.call() for parts in self.calls]


@dataclass
class Reply:
    """A whole reply: each choice's text, tool calls and logprobs, and the provider's Finish.

    ``first_event_ns``: when its first event was in hand (``time.perf_counter_ns``); a Reply is made then.
    """

    choices: list[ChoiceParts] = field(default_factory=lambda: [ChoiceParts()])
    finish: Finish | None = None
    first_event_ns: int = field(default_factory=time.perf_counter_ns)

    def add(self, event: TextDelta | ToolCallDelta) -> None:
        while len(self.choices) <= event.index:
            self.choices.append(ChoiceParts())
        choice = self.choices[event.index]
        match event:
            case TextDelta(text=text, logprobs=logprobs, thinking=thinking):
                choice.text.append(text)
                choice.logprobs.extend(logprobs)
                if thinking:
                    choice.thinking.append(thinking)
            case ToolCallDelta(call=call, id=call_id, name=name, arguments=arguments):
                while len(choice.calls) <= call:
                    choice.calls.append(CallParts())
                parts = choice.calls[call]
                if call_id:
                    parts.id = call_id
                if name:
                    parts.name = name
                parts.arguments.append(arguments)

    def reason(self, index: int) -> str:
        """Why choice ``index`` ended."""
        assert self.finish is not None
        if self.finish.reasons and index < len(self.finish.reasons):
            return self.finish.reasons[index]
        return self.finish.reason

    @property
    def usage(self) -> Usage:
        assert self.finish is not None
        return usage_of(self.finish)


def sse(payload: msgspec.Struct, event: str | None = None) -> bytes:
    """One server-sent event: the payload's JSON as ``data``, after an ``event:`` line when named."""
    return sse_data(encoder.encode(payload), event)


def sse_data(data: bytes, event: str | None = None) -> bytes:
    """One server-sent event of ``data`` (one line of JSON), named ``event`` if given."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def usage_of(finish: Finish) -> Usage:
    total = finish.prompt_tokens + finish.completion_tokens
    return Usage(finish.prompt_tokens, finish.completion_tokens, total, PromptTokensDetails(finish.cached_tokens))


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]], shutdown: Shutdown) -> T:
    """``await work()``, cancelled if the client disconnects first (then ClientDisconnected)
    or the shutdown grace ends first (then ShuttingDown).

    Only for use once the request body has been read: the next ASGI message is
    then ``http.disconnect``.
    """
    async with Watched(receive, shutdown.stopped) as watched:
        return await work()
    if watched.ended == "stopped":
        raise shutdown.error()
    raise ClientDisconnected("the client disconnected before the response started")


Ended = Literal["disconnected", "stopped"]


class Watched:
    """``async with Watched(receive, stopped) as watched:`` runs its block in the current task
    and cancels it when the client disconnects or ``stopped`` (the end of the shutdown grace)
    completes, whichever comes first. That cancellation ends with the block: the code after
    it runs, and ``watched.ended`` says why the block was cut short (None if it was not).
    Any other cancellation of the task passes through.

    The block runs in the caller's task, watched by one helper task and a callback on
    ``stopped``: no task per block and no ``asyncio.wait`` (a task group's cancellation cost
    about 0.4 ms per request here; a second task and ``asyncio.wait`` a few tens of µs). This
    is how ``asyncio.timeout`` cancels its block, :meth:`asyncio.Task.uncancel` included.

    The helper task starts :data:`WATCH_AFTER` seconds into the block, so a disconnect is
    noticed that much later at most: a block that ends sooner (a fast upstream's whole reply)
    costs no task and no pending receive, which granian completes or drops through its own
    threads (about a tenth of a proxied request's CPU here, bench/gateway.py).
    """

    __slots__ = ("_receive", "_starter", "_stopped", "_task", "_watcher", "ended")

    def __init__(self, receive: Receive, stopped: asyncio.Future[None]) -> None:
        self._receive = receive
        self._stopped = stopped
        self._watcher: asyncio.Future[None] | None = None
        self.ended: Ended | None = None

    async def __aenter__(self) -> Watched:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._starter = task.get_loop().call_later(WATCH_AFTER, self._watch)
        self._stopped.add_done_callback(self._on_stop)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        self._stopped.remove_done_callback(self._on_stop)
        self._starter.cancel()
        if self._watcher is not None:
            self._watcher.remove_done_callback(self._on_disconnect)
            self._watcher.cancel()
        if self.ended is None:
            return False
        # Ours, if no one else cancelled the task too: then the block ends here.
        return self._task.uncancel() == 0 and kind is asyncio.CancelledError

    def _watch(self) -> None:
        self._watcher = asyncio.ensure_future(_disconnected(self._receive))
        self._watcher.add_done_callback(self._on_disconnect)

    def _on_disconnect(self, watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled():
            self._end("disconnected")

    def _on_stop(self, _: asyncio.Future[None]) -> None:
        self._end("stopped")

    def _end(self, why: Ended) -> None:
        if self.ended is None:
            self.ended = why
            self._task.cancel()


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (or receiving fails, which means the same)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:
        log.debug("receive failed while watching for a disconnect", exc_info=True)


async def prime(events: AsyncGenerator[StreamEvent, None]) -> StreamEvent:
    """Pull the first event; on any error or cancellation the stream is closed first."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise LocopilotError("the provider ended the stream without a result") from None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        raise


OnReply = Callable[[Reply], Awaitable[None]]
"""Called with the whole reply once it has finished well, before its last bytes go out
(the Responses API stores it there)."""


async def collect(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    outcome: Outcome,
    recorder: UsageRecorder,
    on_reply: OnReply | None = None,
) -> msgspec.Struct:
    """The whole reply as one response object; records the outcome if it completes. Closes ``events``."""
    reply = Reply()
    try:
        event: StreamEvent | None = first
        while event is not None:
            match event:
                case Finish():
                    reply.finish = event
                case _:
                    reply.add(event)
                    outcome.tokens_out += event.tokens
                    if isinstance(event, TextDelta):
                        outcome.add_text(event.text)
            event = await anext(events, None)
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
    if reply.finish is None:
        raise LocopilotError("the provider ended the stream without finishing")
    outcome.settle(reply.finish)
    if on_reply is not None:
        await on_reply(reply)
    await recorder.settle(outcome)
    return formatter.whole(reply)


def sse_response(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    *,
    outcome: Outcome,
    recorder: UsageRecorder,
    headers: dict[str, str],
    shutdown: Shutdown,
    on_reply: OnReply | None = None,
) -> Stream:
    """Stream the reply in ``formatter``'s form; the body closes ``events`` and records the outcome."""
    ending = Ending(shutdown, formatter)
    return SSEStream(
        _stream_body(first, events, formatter, outcome, recorder, ending, on_reply),
        ending,
        media_type=formatter.media_type,
        headers={**SSE_HEADERS, **headers},
    )


@dataclass
class Ending:
    """How a streamed body ends: ``last`` is set by the body generator just before it yields
    its last chunk; ``shutdown`` cuts it off when the grace is over, with ``formatter``'s error event."""

    shutdown: Shutdown
    formatter: Formatter
    last: bool = False


class SSEStream(Stream):
    """Litestar's Stream, sent by :class:`_WatchedBody`: one fewer write and no task group per response."""

    __slots__ = ("ending",)

    def __init__(self, content: AsyncGenerator[bytes, None], ending: Ending, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.ending = ending

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        assert isinstance(response, ASGIStreamingResponse)
        return _WatchedBody(response, self.ending)


class _WatchedBody(ASGIStreamingResponse):
    """Sends the body as Litestar does, with two differences:

    - the last chunk goes out with ``more_body: False`` instead of being followed
      by an empty one (each ASGI send is a hop through the server);
    - the client's disconnect and the end of the shutdown grace are watched by
      :class:`Watched`; at the latter the stream ends with an SSE error event.

    It leans on Litestar's internals (the response's slots): see :mod:`locopilot.dependency_internals`.
    """

    __slots__ = ("ending",)

    def __init__(self, response: ASGIStreamingResponse, ending: Ending) -> None:
        # Adopt the prepared response's state (headers, cookies, status, iterator).
        for cls in type(response).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(response, slot):
                    setattr(self, slot, getattr(response, slot))
        self.ending = ending

    async def send_body(self, send: Send, receive: Receive) -> None:
        shutdown = self.ending.shutdown
        async with Watched(receive, shutdown.stopped) as watched:
            await self._stream(send)
        if watched.ended == "stopped" and not self.ending.last:
            body = self.ending.formatter.failure(shutdown.error())
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, send: Send) -> None:
        body = self.iterator
        try:
            async for chunk in body:
                data = chunk if isinstance(chunk, bytes) else chunk.encode(self.encoding)
                await send({"type": "http.response.body", "body": data, "more_body": not self.ending.last})
            # The loop went on past the last chunk, so the body generator ran to its end.
            if not self.ending.last:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if isinstance(body, AsyncGenerator):  # cancelled mid-way: close it now, not at garbage collection
                with anyio.CancelScope(shield=True):
                    await body.aclose()


async def _stream_body(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    outcome: Outcome,
    recorder: UsageRecorder,
    ending: Ending,
    on_reply: OnReply | None,
) -> AsyncGenerator[bytes, None]:
    """The bytes of one streamed reply. The outcome is recorded (committed) before the last
    chunk goes out, so a client that has the whole reply can find it in the log."""
    outcome.streaming = True
    reply = Reply() if on_reply is not None else None
    try:
        # Events that are ready together go out in one write: each write is a hop
        # through the server, and the client cannot tell the difference.
        pending = formatter.opening()
        event: StreamEvent | None = first
        while event is not None:
            match event:
                case Finish():
                    outcome.settle(event)
                    if reply is not None and on_reply is not None:
                        reply.finish = event
                        await on_reply(reply)
                    closing = formatter.closing(event)
                    await recorder.settle(outcome)
                    ending.last = True
                    yield pending + closing
                    return
                case _:
                    outcome.tokens_out += event.tokens
                    if isinstance(event, TextDelta):
                        outcome.add_text(event.text)
                    if reply is not None:
                        reply.add(event)
                    data = pending + formatter.event(event)
                    if data:
                        yield data
                        pending = b""
            event = await anext(events, None)
        raise LocopilotError("the provider ended the stream without finishing")
    except LocopilotError as exc:
        log.warning("stream failed after the first byte: %s", exc.loggable())
        await recorder.settle(outcome, error=exc)
        ending.last = True
        yield formatter.failure(exc)
    except Exception as exc:
        log.exception("stream failed after the first byte")
        await recorder.settle(outcome, error=exc)
        ending.last = True
        yield formatter.failure(LocopilotError("internal error while streaming"))
    except BaseException as exc:  # cancelled (the client left, or the shutdown grace is over)
        recorder.finish(outcome, error=ending.shutdown.error() if ending.shutdown.stopped.done() else exc)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
