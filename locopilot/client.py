"""A client of a locopilot server: the one way this code base talks to one.

The command line talks to the server on its machine (:mod:`locopilot.cli.remote` finds it and
its key); a server talks to another locopilot it sends training jobs to
(:mod:`locopilot.training.remote`). Both go through here:

- **One connection pool per server.** :func:`sync_client` and :func:`async_client` make the
  httpx client that its owner keeps for as long as it talks to that server, and closes. Both
  set ``trust_env=False``: an ``HTTP_PROXY`` in the environment never sees a key or a prompt.
- **The server's own Structs**: answers are decoded into :mod:`locopilot.schemas.training`'s
  and :mod:`locopilot.schemas.openai`'s types (:func:`answer`), never read as ``dict[str, Any]``.
- **One SSE reader**: :class:`~locopilot.sse.EventParser`, under
  :func:`events` and :func:`aevents`; :func:`job_log_event` and :func:`chat_text` read what
  the log and chat streams carry.
- **One error mapping**, :func:`refusal`, for an error answer (``{"error": {"message", "type",
  "param", "code"}}``, with ``upgrade_url`` where a paid plan is asked for) and, as
  :func:`stream_error`, for an error event inside a stream:

      400                 InvalidRequest, with the server's message
      404                 NotFound, with the server's message
      any other status    UpstreamError (retryable for 5xx), keeping the status and the raw
                          body so that a 401/403 passes through a server unchanged
      an error event      UpstreamError(retryable=False): the stream had started

  The message is the server's (a body that is not an error object: its first 500
  characters, or ``HTTP <status>``), after ``<who>: `` when the caller names the server.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Literal, TypeVar

import httpx
import msgspec

from locopilot.errors import InvalidRequest, LocopilotError, NotFound, UpstreamError
from locopilot.schemas.openai import ChatChunkChoice
from locopilot.schemas.training import JobErrorInfo, JobInfo, LogEvent
from locopilot.sse import EventParser

T = TypeVar("T")

#: Connect and write timeouts; reads wait as long as the server takes (streams, long uploads).
TIMEOUT = httpx.Timeout(30.0, connect=10.0, read=None)
#: Bytes of an error body kept when it is not an error object.
SHOWN_BODY = 500


class ServerErrorDetail(msgspec.Struct):
    """The ``error`` object of a locopilot server's error answer (:meth:`LocopilotError.body`)."""

    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None
    upgrade_url: str | None = None
    """Set by a server that wants a paid plan (passed through from an upstream)."""


class _ErrorAnswer(msgspec.Struct):
    error: ServerErrorDetail


class _ChatChunk(msgspec.Struct):
    """A chat stream's event: a chunk (``ChatCompletionChunk``'s choices) or an error."""

    choices: list[ChatChunkChoice] = []
    error: ServerErrorDetail | None = None


_error_answer = msgspec.json.Decoder(_ErrorAnswer)
_chat_chunk = msgspec.json.Decoder(_ChatChunk)
_log_event = msgspec.json.Decoder(LogEvent)
_job = msgspec.json.Decoder(JobInfo)
_job_error = msgspec.json.Decoder(JobErrorInfo)


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def sync_client(url: str, key: str, *, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    """The command line's pool for the server at ``url``, sending ``key`` (none when empty)."""
    return httpx.Client(base_url=url, headers=_headers(key), verify=verify, trust_env=False, timeout=TIMEOUT)


def async_client(url: str, key: str) -> httpx.AsyncClient:
    """A server's pool for another locopilot at ``url`` (its ``/v1``), sending ``key`` (none when empty)."""
    return httpx.AsyncClient(base_url=url.rstrip("/"), headers=_headers(key), trust_env=False, timeout=TIMEOUT)


def error_detail(status: int, content: bytes) -> ServerErrorDetail:
    """What an error answer says; a body that is not an error object becomes its first characters."""
    try:
        return _error_answer.decode(content).error
    except msgspec.DecodeError:
        text = content[:SHOWN_BODY].decode("utf-8", "replace")
        return ServerErrorDetail(text or f"HTTP {status}")


def refusal(status: int, content: bytes, *, who: str | None = None) -> LocopilotError:
    """The error for an error answer (see the module docstring)."""
    message = error_detail(status, content).message
    said = f"{who}: {message}" if who else message
    if status == 400:
        return InvalidRequest(said)
    if status == 404:
        return NotFound(said)
    return UpstreamError(said, retryable=status >= 500, upstream_status=status, upstream_body=content)


def stream_error(data: str, *, who: str | None = None) -> UpstreamError:
    """The error for an error event (``{"error": {...}}``) inside a stream that had started."""
    message = error_detail(200, data.encode()).message
    return UpstreamError(f"{who}: {message}" if who else message, retryable=False)


def answer(response: httpx.Response, kind: type[T], *, who: str | None = None) -> T:
    """The body of a read answer as ``kind``; raises :func:`refusal`'s error for an error answer."""
    if response.status_code >= 400:
        raise refusal(response.status_code, response.content, who=who)
    return msgspec.json.decode(response.content, type=kind)


def events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """The server-sent events of a streamed answer, as ``(event, data)``."""
    parser = EventParser()
    for chunk in response.iter_bytes():
        yield from parser.feed(chunk)


async def aevents(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """The server-sent events of a streamed answer, as ``(event, data)``."""
    parser = EventParser()
    async for chunk in response.aiter_bytes():
        for event in parser.feed(chunk):
            yield event


JobLogEvent = tuple[Literal["message", "metrics"], LogEvent] | tuple[Literal["end"], JobInfo]


def job_log_event(event: str, data: str, *, who: str | None = None) -> JobLogEvent | None:
    """One event of a job's log stream (``…/jobs/{id}/logs``); None for one this client does not know.
    Its ``error`` event (the server is stopping) raises UpstreamError(retryable=True): follow again."""
    match event:
        case "message" | "metrics":
            return event, _log_event.decode(data)
        case "end":
            return "end", _job.decode(data)
        case "error":
            message = _job_error.decode(data).message
            raise UpstreamError(f"{who}: {message}" if who else message, retryable=True)
    return None


def chat_text(data: str) -> Iterator[str]:
    """The text pieces of one chat stream event (first choice on); raises :func:`stream_error`'s error."""
    if data == "[DONE]":
        return
    chunk = _chat_chunk.decode(data)
    if chunk.error is not None:
        raise UpstreamError(chunk.error.message, retryable=False)
    for choice in chunk.choices:
        if isinstance(choice.delta.content, str) and choice.delta.content:
            yield choice.delta.content
