"""Recording each request's outcome in the request log, and its access line.

A row is written by the database's writer thread, off the request path; but a reply
is not finished until its row is committed (:meth:`UsageRecorder.settle`, at most
:data:`COMMIT_WAIT` seconds), so a client that has its whole reply can count on the
row being there even if the server is killed the next instant.

Rows finished in one turn of the event loop go to the database together (:class:`_Batch`):
one queued write, one commit and one wake-up of the loop for all of them, instead of one
each. Under load many requests end in the same turn; alone, a row waits for nothing more
than the rest of the turn it was finished in.

asyncio, not anyio, here: this runs in every request (the hot path), and the batching is made
of the loop's own turn and callbacks (``call_soon``, ``call_later``, ``call_soon_threadsafe``
from the writer thread) and one plain future per reply (see :class:`_Batch`), which anyio has
no cheaper form of.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import msgspec

from locopilot.errors import ClientDisconnected, LocopilotError
from locopilot.gateway.router import Decision
from locopilot.providers.base import Finish
from locopilot.store import logs
from locopilot.store.db import Database, StoreError

if TYPE_CHECKING:
    from locopilot.gateway.metrics import RequestMetrics
    from locopilot.gateway.ratelimit import Admission

log = logging.getLogger(__name__)
access_log = logging.getLogger("locopilot.access")

#: The longest a reply's last bytes wait for its row's commit (normally well under a millisecond):
#: a stuck disk delays answers by this much at most, and never fails them.
COMMIT_WAIT = 2.0


@dataclass
class Outcome:
    """What one request did; filled in as it runs, recorded once at the end."""

    request_id: str
    endpoint: str
    model: str
    provider: str = ""  # empty until a provider serves the request
    key_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    ttfb: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0  # of tokens_in, those the provider's prompt cache supplied
    tool_parse_failures: int = 0  # tool calls the model generated that could not be parsed
    streaming: bool = False  # the 200 and the first bytes have gone out
    routing: Decision | None = None
    admission: Admission | None = None
    """The request's quota admission: finishing the outcome charges its tokens and frees its place."""
    prompt: str | None = None
    """JSON: the messages, prompt or inputs, kept for the log row only with LOCOPILOT_LOG_PROMPTS."""
    completion: list[str] | None = None
    """The reply's text as it arrives, kept only when ``prompt`` is (see :meth:`keep_text`)."""
    recorded: bool = False

    def keep_text(self, request: object, *, reply: bool = True) -> None:
        """Store ``request`` (messages, prompt or inputs) as JSON, and with ``reply`` the reply text, in the log row."""
        self.prompt, self.completion = msgspec.json.encode(request).decode(), [] if reply else None

    def add_text(self, text: str) -> None:
        if self.completion is not None:
            self.completion.append(text)

    def settle(self, finish: Finish) -> None:
        """Take the token counts from the provider's final word on the reply."""
        self.tokens_in, self.tokens_out = finish.prompt_tokens, finish.completion_tokens
        self.tokens_cached = finish.cached_tokens
        self.tool_parse_failures = finish.tool_parse_failures


class UsageRecorder:
    def __init__(
        self,
        db: Database,
        metrics: RequestMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self._batch: _Batch | None = None

    @asynccontextmanager
    async def recording(self, outcome: Outcome) -> AsyncIterator[Outcome]:
        """Record ``outcome`` as failed if the block raises (and re-raise, once the row
        is committed: the error response is an answer too). A cancelled block (the
        client has gone) does not wait."""
        try:
            yield outcome
        except Exception as exc:
            await self.settle(outcome, error=exc)
            raise
        except BaseException as exc:
            self.finish(outcome, error=exc)
            raise

    async def settle(self, outcome: Outcome, *, error: BaseException | None = None) -> None:
        """:meth:`finish`, then wait until the row is committed (at most :data:`COMMIT_WAIT` s).

        Call it before the reply's last bytes go out. Cancelling the wait does not
        cancel the write. A failed write was logged by the store; the reply goes on.
        """
        committed = self.finish(outcome, error=error)
        if committed is not None:
            await committed

    def finish(self, outcome: Outcome, *, error: BaseException | None = None) -> asyncio.Future[None] | None:
        """Queue the log row for ``outcome``, write its access line, count it in the metrics and settle its quota
        admission; a second call for the same outcome does nothing.

        Returns a future of this row's own that completes (never with an error) once the row's
        batch has been committed or has failed (a failed write is logged by the store), or after
        :data:`COMMIT_WAIT` seconds, whichever comes first; None when nothing was queued.
        Cancelling it cancels no one else's wait. Call it on the event loop.

        ``http_status`` is what the client got: once streaming has begun that is
        200 even if the stream then ended with an error event.
        """
        if outcome.recorded:
            return None
        outcome.recorded = True
        if outcome.admission is not None:
            outcome.admission.finish(outcome.tokens_in + outcome.tokens_out)
        status: logs.LogStatus
        if error is None:
            status, http_status, message, code = "ok", 200, None, None
        elif isinstance(error, ClientDisconnected | anyio.get_cancelled_exc_class() | GeneratorExit):
            status, http_status, message = "cancelled", ClientDisconnected.status_code, "client disconnected"
            code = "client_disconnected"
        elif isinstance(error, LocopilotError):
            status, http_status = "error", error.status_code
            # Not an upstream's or a template's words: they may quote the prompt, and the stats group rows by this.
            message = error.loggable()
            code = error.code or error.error_type
        else:
            status, http_status, message = "error", 500, type(error).__name__
            code = type(error).__name__
        if outcome.streaming:
            http_status = 200
        seconds = self.clock() - outcome.started
        if self.metrics is not None:
            self.metrics.observe(outcome, http_status, seconds)
        row = logs.InferenceLog(
            request_id=outcome.request_id,
            key_id=outcome.key_id,
            endpoint=outcome.endpoint,
            model=outcome.model,
            provider=outcome.provider,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
            tokens_cached=outcome.tokens_cached,
            latency_ms=seconds * 1000,
            ttfb_ms=None if outcome.ttfb is None else outcome.ttfb * 1000,
            status=status,
            http_status=http_status,
            error=message,
            created_at=self.wall_clock(),
            routing=None if outcome.routing is None else msgspec.json.encode(outcome.routing).decode(),
            prompt=outcome.prompt,
            completion=None if outcome.completion is None else "".join(outcome.completion),
        )
        log_outcome(row, code)
        if self._batch is None:
            self._batch = _Batch(asyncio.get_running_loop())
            self._batch.loop.call_soon(self._flush)
        return self._batch.add(row)

    def _flush(self) -> None:
        """Queue the rows finished in this turn of the loop as one write."""
        batch, self._batch = self._batch, None
        assert batch is not None
        try:
            written = logs.record_many(self.db, batch.rows)
        except StoreError as exc:
            log.error("request log unavailable: %s", exc)
            batch.complete()
            return
        batch.timer = batch.loop.call_later(COMMIT_WAIT, batch.expire)
        written.add_done_callback(batch.done)


class _Batch:
    """The log rows of one turn of the event loop, and the futures their replies wait on.

    One future per reply, awaited directly: the reply's task resumes in the turn after the
    commit is known (``asyncio.wait`` or ``asyncio.shield`` around one shared future would
    cost a turn more), and a reply whose client has gone cancels only its own. One timer per
    batch bounds every wait to :data:`COMMIT_WAIT`.
    """

    __slots__ = ("loop", "rows", "timer", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rows: list[logs.InferenceLog] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None

    def add(self, row: logs.InferenceLog) -> asyncio.Future[None]:
        self.rows.append(row)
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiters.append(waiter)
        return waiter

    def done(self, _: Future[int]) -> None:
        """On the writer thread, once the write has ended either way (the store logged a failure)."""
        self.loop.call_soon_threadsafe(self.complete)

    def expire(self) -> None:
        log.warning(
            "the request log took over %g s to commit %d rows; answering without waiting", COMMIT_WAIT, len(self.rows)
        )
        self.complete()

    def complete(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


def log_outcome(row: logs.InferenceLog, code: str | None) -> None:
    """The request's access line (see :mod:`locopilot.gateway.access`); an error's code, not its
    message, which may quote what the client sent."""
    access_log.log(
        logging.WARNING if row.http_status >= 500 else logging.INFO,
        "%s %s %d",
        row.endpoint,
        row.model,
        row.http_status,
        extra={
            "event": "request",
            "request_id": row.request_id,
            "key_id": row.key_id,
            "endpoint": row.endpoint,
            "model": row.model,
            "provider": row.provider,
            "status": row.http_status,
            "outcome": row.status,
            "error": code,
            "latency_ms": round(row.latency_ms, 3),
            "ttfb_ms": None if row.ttfb_ms is None else round(row.ttfb_ms, 3),
            "tokens_in": row.tokens_in,
            "tokens_out": row.tokens_out,
        },
    )
