"""The training worker: one process per job, started as ``locopilot _train`` (the same executable).

Protocol, framed messages as every child speaks them (:mod:`locopilot.children`):

- parent → worker, stdin: :class:`Train` first; later :class:`Cancel`, which takes effect
  between chunks, since a llama.cpp training step cannot be interrupted. End of input (the
  parent died or closed the worker) ends the worker at once, exit status 3, with nothing written.
- worker → parent, stdout: the trainer's events (``Started``, ``Progress``..., ``Finished``),
  or a last :class:`Failed` (``refused`` true when nothing was trained: bad dataset, config,
  memory) or :class:`Cancelled`. A worker that ends without one of those crashed (a llama.cpp
  abort); its stderr says why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import IO

import msgspec

from locopilot.children import Child, Codec, ProtocolError, Receiver, Sender, prologue
from locopilot.training.trainer import Event, Finished, TrainConfig


class Train(msgspec.Struct, tag="train", frozen=True):
    config: TrainConfig


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    pass


class Failed(msgspec.Struct, tag="failed"):
    error: str
    refused: bool = False


class Cancelled(msgspec.Struct, tag="cancelled"):
    pass


ToWorker = Train | Cancel
WorkerEvent = Event | Failed | Cancelled
#: How long a closed worker may take to exit on its own (it has finished, or is between chunks).
CLOSE_GRACE_S = 2.0
to_worker: Codec[ToWorker] = Codec(ToWorker)
from_worker: Codec[WorkerEvent] = Codec(WorkerEvent)


class TrainingFailed(Exception):
    """The worker reported a failure or ended without a result."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class JobCancelled(Exception):
    """The worker stopped between chunks because the job was cancelled."""


def main() -> int:
    """``locopilot _train``: run the job read from stdin, events on stdout (see the module docstring)."""
    from locopilot.training.trainer import TrainingCancelled, TrainingRefused, train

    out = Sender(prologue())  # Ctrl-C is ignored: the parent decides, and says Cancel
    requests = Receiver(0, to_worker)
    try:
        job = requests.receive()
    except ProtocolError as exc:
        job = None
        problem = str(exc)
    else:
        problem = "no job" if job is None else f"expected a train message, got {type(job).__name__}"
    if not isinstance(job, Train):
        out.send(Failed(f"bad job: {problem}", refused=True))
        return 2
    cancel = threading.Event()

    def read_cancel() -> None:
        with contextlib.suppress(ProtocolError):
            for request in requests:
                if isinstance(request, Cancel):
                    cancel.set()
                    return
        # End of input: the parent is gone (or done with us), and nobody will read a result, so
        # stop now rather than after the current phase (an F32 conversion, a loss pass, a chunk).
        os._exit(3)

    threading.Thread(target=read_cancel, name="cancel-reader", daemon=True).start()
    try:
        train(job.config, out.send, cancel.is_set)
    except TrainingRefused as exc:
        out.send(Failed(str(exc), refused=True))
        return 1
    except TrainingCancelled:
        out.send(Cancelled())
        return 0
    except (RuntimeError, OSError) as exc:
        out.send(Failed(f"{type(exc).__name__}: {exc}"))
        return 1
    return 0


class TrainingWorker:
    """A running worker process. Iterate :meth:`events`; :meth:`cancel` asks it to stop.

    The caller closes it (or uses it as a context manager), which kills a worker still running.
    """

    def __init__(self, config: TrainConfig, *, stderr: IO[bytes] | int | None = None) -> None:
        self.child = Child("_train", from_worker, stderr=stderr)
        self.child.send(Train(config=config))

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.process

    def events(self) -> Iterator[WorkerEvent]:
        """Each event as the worker reports it, until its output ends."""
        return iter(self.child)

    def cancel(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # already gone
            self.child.send(Cancel())

    def stop(self, grace: float) -> int:
        """End of input (the worker exits at once), ``grace`` seconds for that, then SIGKILL.
        Safe from another thread than the one reading :meth:`events`."""
        return self.child.stop(grace)

    def close(self) -> None:
        """:meth:`stop` with :data:`CLOSE_GRACE_S`, and let go of the pipes."""
        self.child.close(CLOSE_GRACE_S)

    def __enter__(self) -> TrainingWorker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def run(
    config: TrainConfig, on_event: Callable[[WorkerEvent], None], *, stderr: IO[bytes] | int | None = None
) -> Finished:
    """Run one job in a worker to the end, passing each event to ``on_event``.

    Raises TrainingFailed (``refused`` when nothing was trained) or JobCancelled.
    """
    with TrainingWorker(config, stderr=stderr) as worker:
        last: WorkerEvent | None = None
        for event in worker.events():
            on_event(event)
            last = event
        code = worker.process.wait()
    match last:
        case Finished():
            return last
        case Failed(error=error, refused=refused):
            raise TrainingFailed(error, refused=refused)
        case Cancelled():
            raise JobCancelled
    raise TrainingFailed(f"the training worker ended with status {code} before finishing (see its log)")
