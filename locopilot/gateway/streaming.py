"""Primed streaming: turn a provider's event stream into an HTTP response.

The first event is pulled before any status is sent, so an error before the
first token is a real HTTP error (and, with several providers, failover is
still possible). After the first byte, an error becomes an SSE ``error`` event
and the stream ends. Either way the request's outcome is recorded once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Protocol

import anyio
import msgspec
from litestar import Response
from litestar.response import Stream

from locopilot.errors import LocopilotError
from locopilot.gateway.usage import Outcome, UsageRecorder
from locopilot.providers.base import Finish, StreamEvent, TextDelta
from locopilot.schemas.openai import Usage

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()

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
    return b"data: " + _json.encode(payload) + b"\n\n"


async def prime(events: AsyncGenerator[StreamEvent, None]) -> StreamEvent:
    """Pull the first event; on error the stream is closed and the error raised."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise LocopilotError("the provider ended the stream without a result") from None
    except BaseException:
        await events.aclose()
        raise


def usage_of(finish: Finish) -> Usage:
    return Usage(finish.prompt_tokens, finish.completion_tokens, finish.prompt_tokens + finish.completion_tokens)


async def respond(
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    *,
    stream: bool,
    include_usage: bool,
    outcome: Outcome,
    recorder: UsageRecorder,
    headers: dict[str, str],
    clock: Callable[[], float] = time.perf_counter,
) -> Response[bytes] | Stream:
    """Prime ``events`` and answer with JSON or SSE; records the outcome when done.

    Raises (after recording) any error that happens before the first event.
    """
    try:
        first = await prime(events)
    except BaseException as exc:
        recorder.finish(outcome, error=exc)
        raise
    outcome.ttfb = clock() - outcome.started
    if not stream:
        return await _collect(first, events, formatter, outcome, recorder, headers)
    return Stream(
        _sse_body(first, events, formatter, include_usage, outcome, recorder),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


async def _collect(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    outcome: Outcome,
    recorder: UsageRecorder,
    headers: dict[str, str],
) -> Response[bytes]:
    parts: list[str] = []
    finish: Finish | None = None
    try:
        for event in _chain(first):
            finish = _absorb(event, parts, outcome)
        async for event in events:
            finish = _absorb(event, parts, outcome)
    except BaseException as exc:
        recorder.finish(outcome, error=exc)
        raise
    finally:
        await events.aclose()
    if finish is None:
        error = LocopilotError("the provider ended the stream without finishing")
        recorder.finish(outcome, error=error)
        raise error
    recorder.finish(outcome)
    body = formatter.response("".join(parts), finish.reason, usage_of(finish))
    return Response(_json.encode(body), media_type="application/json", headers=headers)


def _chain(first: StreamEvent) -> Iterator[StreamEvent]:
    yield first


def _absorb(event: StreamEvent, parts: list[str], outcome: Outcome) -> Finish | None:
    match event:
        case TextDelta(text=text, tokens=tokens):
            parts.append(text)
            outcome.tokens_out += tokens
            return None
        case Finish():
            outcome.tokens_in = event.prompt_tokens
            outcome.tokens_out = event.completion_tokens
            return event


async def _sse_body(
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    formatter: Formatter,
    include_usage: bool,
    outcome: Outcome,
    recorder: UsageRecorder,
) -> AsyncGenerator[bytes, None]:
    error: BaseException | None = None
    try:
        opening = formatter.first()
        if opening is not None:
            yield sse(opening)
        event: StreamEvent | None = first
        while event is not None:
            match event:
                case TextDelta(text=text, tokens=tokens):
                    outcome.tokens_out += tokens
                    yield sse(formatter.delta(text))
                case Finish():
                    outcome.tokens_in = event.prompt_tokens
                    outcome.tokens_out = event.completion_tokens
                    yield sse(formatter.finish(event.reason))
                    if include_usage:
                        yield sse(formatter.usage_chunk(usage_of(event)))
                    yield b"data: [DONE]\n\n"
                    return
            event = await anext(events, None)
        raise LocopilotError("the provider ended the stream without finishing")
    except LocopilotError as exc:
        error = exc
        log.warning("stream failed after the first byte: %s", exc.message)
        yield sse(exc.body())
    except anyio.get_cancelled_exc_class() as exc:
        error = exc
        raise
    except Exception as exc:
        error = exc
        log.exception("stream failed after the first byte")
        yield sse(LocopilotError("internal error while streaming").body())
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        recorder.finish(outcome, error=error)
