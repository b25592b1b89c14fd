"""The runner's scheduling loop and its mailbox: :func:`serve` takes jobs and cancellations
from the :class:`Inbox` between decode steps, runs the :class:`~locopilot.engine.batching.Engine`'s
steps, and writes what each round produces through the :class:`Outbox` in one write.

The loop is llama.cpp server's in shape: take new tasks, then update every slot; a cancel is
just another message, kept in :class:`Cancellations` until its job ends.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from locopilot.engine.batching import Engine, Send
from locopilot.engine.protocol import (
    Cancel,
    Count,
    Counted,
    Done,
    Embed,
    Embeddings,
    Failed,
    FromRunner,
    Generate,
    RequestError,
    ToRunner,
)

log = logging.getLogger("locopilot.runner")


#: The runner's reader (:meth:`locopilot.children.Receiver.receive_all`): every message that has
#: arrived, waiting up to the given seconds (None: as long as it takes); None once the input ended.
Receive = Callable[[float | None], list[ToRunner] | None]


class Inbox:
    """The runner's requests, read by the scheduling loop itself between steps (no reader thread).

    Cancels go to ``cancellations`` as they are read; jobs come back in the order they arrived.
    The end of input (the API process closed it, or is gone) cancels every job.
    """

    def __init__(self, receive: Receive, cancellations: Cancellations) -> None:
        self.receive = receive
        self.cancellations = cancellations
        self.open = True

    def take(self, wait: bool) -> list[Generate | Embed | Count]:
        """The jobs that have arrived; with ``wait``, blocks until one does or the input ends."""
        if not self.open:
            return []
        jobs: list[Generate | Embed | Count] = []
        while True:
            messages = self.receive(None if wait and not jobs else 0)
            if messages is None:
                self.open = False
                self.cancellations.close()
                return jobs
            for message in messages:
                if isinstance(message, Cancel):
                    self.cancellations.cancel(message.id)
                elif isinstance(message, Generate | Embed | Count):
                    self.cancellations.begin(message.id)
                    jobs.append(message)
                else:
                    log.warning("ignoring a second load message")
            if jobs or not wait:
                return jobs


def serve(engine: Engine, inbox: Inbox, send: Send) -> None:
    """The scheduling loop (continuous batching) until the inbox's input ends and its work is done.

    Between decode steps it reads what has arrived (new jobs and cancellations: all of them,
    so requests that came during a step start together), ends cancelled sequences and admits
    waiting jobs to free slots; each step then advances every active sequence. With
    nothing to do it blocks on its input. An embedding request (or a token count) runs whole
    between two steps. What a round produces goes out in two writes at most: one before the
    step, one after it.
    """
    cancellations = inbox.cancellations
    outbox = Outbox(send, cancellations)
    waiting: deque[Generate] = deque()
    while inbox.open or engine.busy or waiting:
        idle = not engine.busy and not waiting
        arrived = inbox.take(wait=False)
        if idle and not arrived and inbox.open:
            # Nothing to do: a moment to keep long prompts' caches on disk, then wait for work.
            engine.save_prompts()
            arrived = inbox.take(wait=True)
        for job in arrived:  # it grows: what came while an embedding ran
            if isinstance(job, Embed):
                arrived += inbox.take(wait=False)  # a Cancel for this one, say
                outbox.put(embed_one(engine, job, cancellations))
                outbox.flush()
            elif isinstance(job, Count):
                outbox.put(count_one(engine, job))
                outbox.flush()
            else:
                waiting.append(job)
        for message in engine.cancel(cancellations.__contains__):
            outbox.put(message)
        for job in [j for j in waiting if j.id in cancellations]:
            waiting.remove(job)
            outbox.put(Done(id=job.id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0))
        while waiting and engine.can_start(waiting[0]):
            job = waiting.popleft()
            try:
                for message in engine.start(job):
                    outbox.put(message)
            except RequestError as exc:
                outbox.put(Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param))
            except Exception as exc:
                log.exception("request %s failed", job.id)
                outbox.put(Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}"))
        outbox.flush()
        for message in engine.step():
            outbox.put(message)
        outbox.flush()


class Outbox:
    """Messages for the API process, written together.

    A decode step makes a message for every sequence in it; written one at a
    time, each would be a system call and a wakeup of the API process, which
    competes with llama.cpp's threads for the same cores. A terminal message
    also ends its job's cancellation record, once it is written.
    """

    def __init__(self, send: Send, cancellations: Cancellations) -> None:
        self.send = send
        self.cancellations = cancellations
        self.messages: list[FromRunner] = []

    def put(self, message: FromRunner) -> None:
        self.messages.append(message)

    def flush(self) -> None:
        if not self.messages:
            return
        messages, self.messages = self.messages, []
        self.send(messages)
        for message in messages:
            if isinstance(message, Done | Failed | Embeddings | Counted):
                self.cancellations.finish(message.id)


class Cancellations:
    """Which jobs to stop, recorded as the :class:`Inbox` reads them and consulted between steps.

    Only jobs the runner has received and not finished can be cancelled, so a
    Cancel that arrives after its job ended is dropped instead of kept forever.
    Once stdin ends (the API process is gone) every job counts as cancelled.
    """

    def __init__(self) -> None:
        self._live: set[int] = set()
        self._ids: set[int] = set()
        self._closed = False
        self._lock = threading.Lock()

    def begin(self, job_id: int) -> None:
        with self._lock:
            self._live.add(job_id)

    def cancel(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._live:
                self._ids.add(job_id)

    def close(self) -> None:
        self._closed = True

    def __contains__(self, job_id: int) -> bool:
        return self._closed or job_id in self._ids

    def finish(self, job_id: int) -> None:
        with self._lock:
            self._live.discard(job_id)
            self._ids.discard(job_id)


def embed_one(engine: Engine, job: Embed, cancelled: Cancellations) -> FromRunner:
    """The one answer to an embedding job: its vectors, Failed, or Done when it was cancelled."""
    try:
        if job.id in cancelled:
            return Done(id=job.id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0)
        return engine.embed(job)
    except RequestError as exc:
        return Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param)
    except Exception as exc:
        log.exception("request %s failed", job.id)
        return Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}")


def count_one(engine: Engine, job: Count) -> FromRunner:
    """The one answer to a token count: Counted, or Failed (a template that fails, say)."""
    try:
        return engine.count(job)
    except RequestError as exc:
        return Failed(id=job.id, kind=exc.kind, message=str(exc), param=exc.param)
    except Exception as exc:
        log.exception("request %s failed", job.id)
        return Failed(id=job.id, kind="internal", message=f"{type(exc).__name__}: {exc}")
