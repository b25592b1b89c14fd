"""Primed streaming: turn a provider's event stream into an HTTP response.

The first event is pulled before any status is sent, so an error before the
first token is a real HTTP error (and, with several providers, failover is
still possible). After the first byte, an error becomes an SSE ``error`` event
and the stream ends. A client that disconnects at any point cancels the work:
while the response is being prepared, :func:`unless_disconnected` watches for
it; once streaming, Litestar's Stream does. Either way the request's outcome
is recorded once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, TypeVar

import anyio
import msgspec
from litestar.response import Stream
from litestar.types import Receive

from locopilot.errors import ClientDisconnected, LocopilotError
from locopilot.gateway.usage import Outcome, UsageRecorder
from locopilot.providers.base import Finish, StreamEvent, TextDelta
from locopilot.schemas.openai import Usage, encoder

log = logging.getLogger(__name__)

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Formatter(Protocol):
    """Builds one endpoint's wire objects (chat or text completion)."""

    def first(self) -> msgspec.Struct | None:
        """A chunk to send before any text (the chat role chunk), or None."""
        ...

    def delta(self, text: str) -> msgspec.Struct: ...

    def finish(self, reason: str) -> msgspec.Struct: ...

    def usage_chunk(self, usage: Usage) -> msgspec.Struct: ...

    def response(self, text: str, reason: str, usage: Usage) -> msgspec.Struct: ...


def sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + encoder.encode(payload) + b"\n\n"


def usage_of(finish: Finish) -> Usage:
    return Usage(finish.prompt_tokens, finish.completion_tokens, finish.prompt_tokens + finish.completion_tokens)


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()``, cancelled if the client disconnects first (then ClientDisconnected).

    Only for use once the request body has been read: the next ASGI message is
    then ``http.disconnect``.
    """
    results: list[T] = []
    errors: list[Exception] = []
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tasks.cancel_scope.cancel()

        async def run() -> None:
            try:
                results.append(await work())
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
                errors.append(exc)
            finally:
                tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        tasks.start_soon(run)
    if errors:
        raise errors[0]
    if not results:
        raise ClientDisconnected("the client disconnected before the response started")
    return results[0]


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


async def collect(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    outcome: Outcome,
    recorder: UsageRecorder,
) -> msgspec.Struct:
    """The whole reply as one response object; records the outcome if it completes. Closes ``events``."""
    parts: list[str] = []
    finish: Finish | None = None
    try:
        event: StreamEvent | None = first
        while event is not None:
            match event:
                case TextDelta(text=text, tokens=tokens):
                    parts.append(text)
                    outcome.tokens_out += tokens
                case Finish():
                    finish = event
            event = await anext(events, None)
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
    if finish is None:
        raise LocopilotError("the provider ended the stream without finishing")
    outcome.tokens_in, outcome.tokens_out = finish.prompt_tokens, finish.completion_tokens
    recorder.finish(outcome)
    return formatter.response("".join(parts), finish.reason, usage_of(finish))


def sse_response(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    *,
    include_usage: bool,
    outcome: Outcome,
    recorder: UsageRecorder,
    headers: dict[str, str],
) -> Stream:
    """Stream the reply as SSE; the body closes ``events`` and records the outcome."""
    return Stream(
        _sse_body(first, events, formatter, include_usage, outcome, recorder),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


async def _sse_body(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    include_usage: bool,
    outcome: Outcome,
    recorder: UsageRecorder,
) -> AsyncGenerator[bytes, None]:
    error: BaseException | None = None
    outcome.streaming = True
    try:
        # Events that are ready together go out in one write: each write is a hop
        # through the server, and the client cannot tell the difference.
        opening = formatter.first()
        pending = sse(opening) if opening is not None else b""
        event: StreamEvent | None = first
        while event is not None:
            match event:
                case TextDelta(text=text, tokens=tokens):
                    outcome.tokens_out += tokens
                    yield pending + sse(formatter.delta(text))
                    pending = b""
                case Finish():
                    outcome.tokens_in, outcome.tokens_out = event.prompt_tokens, event.completion_tokens
                    closing = sse(formatter.finish(event.reason))
                    if include_usage:
                        closing += sse(formatter.usage_chunk(usage_of(event)))
                    yield pending + closing + b"data: [DONE]\n\n"
                    return
            event = await anext(events, None)
        raise LocopilotError("the provider ended the stream without finishing")
    except LocopilotError as exc:
        error = exc
        log.warning("stream failed after the first byte: %s", exc.message)
        yield sse(exc.body())
    except Exception as exc:
        error = exc
        log.exception("stream failed after the first byte")
        yield sse(LocopilotError("internal error while streaming").body())
    except BaseException as exc:  # cancelled, or closed by the server when the client left
        error = exc
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        recorder.finish(outcome, error=error)
