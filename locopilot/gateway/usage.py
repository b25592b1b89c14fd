"""Recording each request's outcome in the request log, without blocking it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    from locopilot.gateway.ratelimit import Admission

log = logging.getLogger(__name__)


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
    streaming: bool = False  # the 200 and the first bytes have gone out
    routing: Decision | None = None
    admission: Admission | None = None
    """The request's quota admission: finishing the outcome charges its tokens and frees its place."""
    recorded: bool = False

    def settle(self, finish: Finish) -> None:
        """Take the token counts from the provider's final word on the reply."""
        self.tokens_in, self.tokens_out = finish.prompt_tokens, finish.completion_tokens
        self.tokens_cached = finish.cached_tokens


class UsageRecorder:
    def __init__(
        self,
        db: Database,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.clock = clock
        self.wall_clock = wall_clock

    @contextmanager
    def recording(self, outcome: Outcome) -> Iterator[Outcome]:
        """Record ``outcome`` as failed if the block raises (and re-raise)."""
        try:
            yield outcome
        except BaseException as exc:
            self.finish(outcome, error=exc)
            raise

    def finish(self, outcome: Outcome, *, error: BaseException | None = None) -> None:
        """Queue the log row for ``outcome`` and settle its quota admission; a second call
        for the same outcome does nothing.

        ``http_status`` is what the client got: once streaming has begun that is
        200 even if the stream then ended with an error event.
        """
        if outcome.recorded:
            return
        outcome.recorded = True
        if outcome.admission is not None:
            outcome.admission.finish(outcome.tokens_in + outcome.tokens_out)
        status: logs.LogStatus
        if error is None:
            status, http_status, message = "ok", 200, None
        elif isinstance(error, ClientDisconnected | anyio.get_cancelled_exc_class() | GeneratorExit):
            status, http_status, message = "cancelled", ClientDisconnected.status_code, "client disconnected"
        elif isinstance(error, LocopilotError):
            status, http_status, message = "error", error.status_code, error.message
        else:
            status, http_status, message = "error", 500, type(error).__name__
        if outcome.streaming:
            http_status = 200
        row = logs.InferenceLog(
            request_id=outcome.request_id,
            key_id=outcome.key_id,
            endpoint=outcome.endpoint,
            model=outcome.model,
            provider=outcome.provider,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
            tokens_cached=outcome.tokens_cached,
            latency_ms=(self.clock() - outcome.started) * 1000,
            ttfb_ms=None if outcome.ttfb is None else outcome.ttfb * 1000,
            status=status,
            http_status=http_status,
            error=message,
            created_at=self.wall_clock(),
            routing=None if outcome.routing is None else msgspec.json.encode(outcome.routing).decode(),
        )
        try:
            logs.record(self.db, row)
        except StoreError as exc:
            log.error("request log unavailable: %s", exc)
