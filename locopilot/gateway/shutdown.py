"""The drain after SIGTERM: what the app does while granian stops.

How a stop goes (see also :mod:`locopilot.server`):

1. SIGTERM (or SIGINT) reaches granian's main process. locopilot's handler there sends
   :data:`DRAIN_SIGNAL` to the worker, then lets granian stop it as usual (SIGTERM).
2. On SIGTERM the worker's granian stops accepting connections (new ones are refused),
   closes idle keep-alive connections and waits for the requests in flight. It tells the
   app nothing until every one has ended, so the app learns of the stop from
   :data:`DRAIN_SIGNAL`: :meth:`Shutdown.begin`. Health checks answer 503 from then on.
3. After ``LOCOPILOT_SHUTDOWN_GRACE`` seconds, :attr:`Shutdown.stopped` completes: every
   request still waiting on a provider is cut off (a stream ends with an SSE error event,
   a reply not yet started is a 503 ``shutting_down``).
4. With no request left, granian runs the lifespan's shutdown: runners stop, the database
   closes (checkpointing the WAL) and the process exits 0.

A worker whose main process has died (``kill -9``) would go on serving the port beside the
next server; :meth:`Shutdown.watch_parent` notices and stops it the same way.

asyncio, not anyio, in three places, each for its reason: :attr:`Shutdown.stopped` is an
``asyncio.Future`` because :class:`locopilot.gateway.streaming.Watched` takes a done-callback on
it in every request (the hot path, explained there); the grace timer is a loop callback
because :meth:`Shutdown.begin` runs in a signal's callback, where no task can be started; and
:func:`on_signal` says why it uses the loop's signal handlers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

import anyio

from locopilot.errors import ShuttingDown

log = logging.getLogger(__name__)

#: What granian's main process sends its worker to start the drain; the worker ignores it
#: until the app is ready to drain (its default action would end the process).
DRAIN_SIGNAL = signal.SIGUSR1
PARENT_CHECK_SECONDS = 1.0


def on_signal(signum: signal.Signals, callback: Callable[..., object], *args: object) -> None:
    """Call ``callback(*args)`` on the event loop each time ``signum`` arrives, for as long as the loop runs.
    Does nothing off the main thread (an app run by a test client), where signals cannot be handled.

    The loop's own handler, not anyio's ``open_signal_receiver``: that one needs a task to read it,
    and puts the signal's default action back when it closes, at the end of the lifespan while the
    database still closes; the default action of SIGUSR1 and SIGHUP ends the process."""
    try:
        asyncio.get_running_loop().add_signal_handler(signum, callback, *args)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        log.debug("not listening for %s: %s", signum.name, exc)


class Shutdown:
    """The app's side of a graceful stop. Use it on one event loop."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self.reason = ""
        self._stopped: asyncio.Future[None] | None = None

    @property
    def stopped(self) -> asyncio.Future[None]:
        """Completes when the grace is over: whatever still runs is to be cut off."""
        if self._stopped is None:
            self._stopped = asyncio.get_running_loop().create_future()
        return self._stopped

    def begin(self, reason: str) -> None:
        """Start the drain (later calls do nothing): report not ready, and stop what
        still runs ``grace`` seconds from now."""
        if self.draining:
            return
        self.draining = True
        self.reason = reason
        log.info(
            "shutting down (%s): requests in flight have %g s to finish", reason, self.grace, extra={"event": "drain"}
        )
        asyncio.get_running_loop().call_later(self.grace, self._expire)

    def _expire(self) -> None:
        if not self.stopped.done():
            log.warning(
                "the shutdown grace of %g s is over: ending the requests still running",
                self.grace,
                extra={"event": "drain_expired"},
            )
            self.stopped.set_result(None)

    def error(self) -> ShuttingDown:
        return ShuttingDown("The server is shutting down; try again in a moment.", retry_after=5)

    def listen(self) -> None:
        """Start the drain on :data:`DRAIN_SIGNAL` (see :func:`on_signal`)."""
        on_signal(DRAIN_SIGNAL, self.begin, "stop signal")

    async def watch_parent(self) -> None:
        """Forever: if the process that started this one goes away, drain and stop (SIGTERM to
        ourselves, which granian's worker takes as its own stop)."""
        parent = os.getppid()
        while os.getppid() == parent:  # noqa: ASYNC110 (nothing to wait on: a parent's death sends no event here)
            await anyio.sleep(PARENT_CHECK_SECONDS)
        self.begin("the main process is gone")
        os.kill(os.getpid(), signal.SIGTERM)
