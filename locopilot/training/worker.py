"""The training worker: one process per job, started as ``locopilot _train`` (the same executable).

Protocol, one JSON object per line:

- parent → worker, stdin: the :class:`~locopilot.training.trainer.TrainConfig` first; later the
  line ``cancel``, which takes effect between chunks, since a llama.cpp training step cannot
  be interrupted. End of input (the parent died or closed the worker) ends the worker at once,
  exit status 3, with nothing written.
- worker → parent, stdout: the trainer's events (``started``, ``progress``..., ``finished``),
  or a last ``failed`` (``refused`` true when nothing was trained: bad dataset, config,
  memory) or ``cancelled``. A worker that ends without one of those crashed (a llama.cpp
  abort); its stderr says why.

stdout is reserved for those lines: llama.cpp prints progress (quantization) on file
descriptor 1, so that descriptor is pointed at stderr and the events go to a private copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO

import msgspec

from locopilot.training.trainer import Event, Finished, TrainConfig


class Failed(msgspec.Struct, tag="failed"):
    error: str
    refused: bool = False


class Cancelled(msgspec.Struct, tag="cancelled"):
    pass


WorkerEvent = Event | Failed | Cancelled
#: How long a closed worker may take to exit on its own (it has finished, or is between chunks).
CLOSE_GRACE_S = 2.0
_decoder = msgspec.json.Decoder(WorkerEvent)
_encoder = msgspec.json.Encoder()


class TrainingFailed(Exception):
    """The worker reported a failure or ended without a result."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class JobCancelled(Exception):
    """The worker stopped between chunks because the job was cancelled."""


def worker_command() -> list[str]:
    """The same program with the hidden subcommand ``_train`` (``-P``: see runner_command)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "_train"]
    return [sys.executable, "-P", "-m", "locopilot", "_train"]


def _fd_lines(fd: int) -> Iterator[bytes]:
    """Lines read from a file descriptor, unbuffered by Python; ends at end of input."""
    pending = b""
    while chunk := os.read(fd, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def main() -> int:
    """``locopilot _train``: run the job read from stdin, events on stdout (see the module docstring)."""
    from locopilot.training.trainer import TrainingCancelled, TrainingRefused, train

    # Ctrl-C in a terminal reaches the whole process group; the parent decides, and says "cancel".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(event: WorkerEvent) -> None:
        out.write(_encoder.encode(event) + b"\n")

    # stdin is read from its file descriptor, never through sys.stdin: a daemon thread blocked
    # in a buffered read holds the buffer's lock, and the interpreter aborts at exit on it.
    lines = _fd_lines(0)
    try:
        config = msgspec.json.decode(next(lines, b""), type=TrainConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        send(Failed(f"bad job: {exc}", refused=True))
        return 2
    cancel = threading.Event()

    def read_cancel() -> None:
        for line in lines:
            if line.strip() == b"cancel":
                cancel.set()
                return
        # End of input: the parent is gone (or done with us), and nobody will read a result, so
        # stop now rather than after the current phase (an F32 conversion, a loss pass, a chunk).
        os._exit(3)

    threading.Thread(target=read_cancel, name="cancel-reader", daemon=True).start()
    try:
        train(config, send, cancel.is_set)
    except TrainingRefused as exc:
        send(Failed(str(exc), refused=True))
        return 1
    except TrainingCancelled:
        send(Cancelled())
        return 0
    except (RuntimeError, OSError) as exc:
        send(Failed(f"{type(exc).__name__}: {exc}"))
        return 1
    return 0


class TrainingWorker:
    """A running worker process. Iterate :meth:`events`; :meth:`cancel` asks it to stop.

    The caller closes it (or uses it as a context manager), which kills a worker still running.
    """

    def __init__(self, config: TrainConfig, *, stderr: IO[bytes] | int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")}
        self.process = subprocess.Popen(
            worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin = self.process.stdin
        self._stdout = self.process.stdout
        self._stdin.write(_encoder.encode(config) + b"\n")
        self._stdin.flush()

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> Iterator[WorkerEvent]:
        """Each event as the worker reports it, until its output ends."""
        for line in self._stdout:
            yield _decoder.decode(line)

    def cancel(self) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):  # already gone
            self._stdin.write(b"cancel\n")
            self._stdin.flush()

    def close(self) -> None:
        """End of input (the worker exits at once), a moment for that, then SIGKILL."""
        with contextlib.suppress(BrokenPipeError):
            self._stdin.close()
        try:
            self.process.wait(timeout=CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stdout.close()

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
