"""Child processes: how they start, the one protocol they speak, and how they end.

Every child is this same program with a hidden subcommand (see ``__main__.py``):

=========  ===========================================  ==========================================
command    the child                                    its parent
=========  ===========================================  ==========================================
_runner    one loaded model (engine/runner.py)          the server (engine/supervisor.py)
_render    a runner's memory-capped chat-template       the runner (engine/template_process.py)
           helper
_train     one fine-tuning job (training/worker.py)     the server (training/jobs.py), ``train``
=========  ===========================================  ==========================================

The protocol: on the child's stdin and stdout, frames of a 4-byte big-endian length and
one msgpack-encoded message, a tagged msgspec Struct of the union its reader expects
(:class:`Codec`). A parent ends a child by closing its stdin (the child reads end of input
and exits), then kills what lingers (:meth:`Child.stop`, :meth:`AsyncChild.stop`). stderr
is the child's log. A child starts with :func:`prologue`, which keeps its stdout for frames.

An external training framework's command is not such a child: it is another program, speaking
no frames and reading no input, so it runs in a process group of its own and is ended the same
way in signals, SIGTERM to the group, a grace, then SIGKILL
(:class:`locopilot.training.adapters.base.FrameworkRun`).

Readers: :class:`Receiver` blocks on a file descriptor (optionally until a deadline) or polls it;
:class:`AsyncReceiver` reads an anyio stream, as many messages at a time as have arrived.
Both buffer what they read past a message for the next call, so nothing is read twice or lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar

import msgspec

if TYPE_CHECKING:
    # anyio is the parent's (the server's) alone: children start without importing it.
    import anyio.abc

MAX_FRAME = 256 * 1024 * 1024
HEADER = struct.Struct(">I")
#: Bytes a reader asks for at once: a round of a runner's messages fits in one.
CHUNK = 1 << 16

T = TypeVar("T")

log = logging.getLogger(__name__)


class ProtocolError(Exception):
    """A frame was malformed or too large, or the stream ended inside one; the pipe cannot be trusted after this."""


# -- starting a child -------------------------------------------------------------------------


def command(subcommand: str) -> list[str]:
    """How to start a child: the same program with the hidden ``subcommand`` (``_runner``, ...).

    ``-P`` keeps the working directory off ``sys.path``: a stray ``llama_cpp/`` there would
    otherwise be imported instead of the real one.
    """
    if getattr(sys, "frozen", False):
        return [sys.executable, subcommand]
    return [sys.executable, "-P", "-m", "locopilot", subcommand]


def environment() -> dict[str, str]:
    """A child's environment: ours without locopilot's settings (which will hold keys)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")}


def prologue() -> BinaryIO:
    """A child's first act: returns its private stdout for frames.

    Ctrl-C at a terminal reaches the whole process group; the parent decides when a child
    ends (it closes the child's stdin), so SIGINT is ignored. llama.cpp and Python print on
    file descriptor 1, so that descriptor is pointed at stderr and frames go to a copy.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


# -- frames -----------------------------------------------------------------------------------


class Codec(Generic[T]):
    """Frames of msgpack: encodes any Struct, decodes the union ``T`` (built once per union)."""

    _encoder = msgspec.msgpack.Encoder()

    def __init__(self, incoming: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(incoming)

    @classmethod
    def encode(cls, message: msgspec.Struct) -> bytes:
        """One frame: header and body."""
        body = cls._encoder.encode(message)
        return HEADER.pack(len(body)) + body

    @classmethod
    def encode_into(cls, messages: Iterable[msgspec.Struct], buffer: bytearray) -> None:
        """Append a frame of each message to ``buffer``, each encoded in place."""
        for message in messages:
            at = len(buffer)
            cls._encoder.encode_into(message, buffer, at + HEADER.size)
            HEADER.pack_into(buffer, at, len(buffer) - at - HEADER.size)

    def decode(self, body: bytes | memoryview) -> T:
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ProtocolError(str(exc)) from exc

    def parse(self, buffer: bytearray) -> list[T]:
        """Every whole frame at the start of ``buffer``, decoded and removed from it."""
        at, end, messages = 0, len(buffer), []
        view = memoryview(buffer)
        try:
            while end - at >= HEADER.size:
                (length,) = HEADER.unpack_from(buffer, at)
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
                stop = at + HEADER.size + length
                if stop > end:
                    break
                messages.append(self.decode(view[at + HEADER.size : stop]))
                at = stop
        finally:
            view.release()
        del buffer[:at]
        return messages


class Sender:
    """Frames written to a blocking stream, each call's in one write; safe across threads."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._buffer = bytearray()

    def send(self, message: msgspec.Struct) -> None:
        self.send_all((message,))

    def send_all(self, messages: Iterable[msgspec.Struct]) -> None:
        """All of ``messages`` in one write (one wakeup of the reader). Raises OSError."""
        with self._lock:
            try:
                Codec.encode_into(messages, self._buffer)
                self.out.write(self._buffer)
                self.out.flush()
            finally:
                self._buffer.clear()


class Receiver(Generic[T]):
    """Messages read from a blocking file descriptor, unbuffered by Python (so a thread may
    block here while the process exits)."""

    def __init__(self, fd: int, codec: Codec[T]) -> None:
        self.fd = fd
        self.codec = codec
        self._buffer = bytearray()
        self._ready: deque[T] = deque()
        self._ended = False

    def _read(self, timeout: float | None) -> bool:
        """One read of what the descriptor holds, waiting up to ``timeout`` seconds (None: as long as it
        takes) for something to read; False if nothing came in time or the input had ended."""
        if self._ended or (timeout is not None and not select.select([self.fd], [], [], max(timeout, 0))[0]):
            return False
        chunk = os.read(self.fd, CHUNK)
        if not chunk:
            if self._buffer:
                raise ProtocolError("stream ended inside a frame")
            self._ended = True
            return False
        self._buffer += chunk
        self._ready.extend(self.codec.parse(self._buffer))
        return True

    def receive(self, timeout: float | None = None) -> T | None:
        """The next message; None at a clean end of input.

        Raises ProtocolError, and TimeoutError when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if not self._read(None if deadline is None else deadline - time.monotonic()):
                if self._ended:
                    return None
                raise TimeoutError
        return self._ready.popleft()

    def receive_all(self, timeout: float | None = None) -> list[T] | None:
        """Every message that has arrived, without waiting for more once there is one: ``[]`` when
        none came within ``timeout`` seconds (0: a look without waiting; None: wait as long as it takes),
        None at a clean end of input once every message before it was returned. Raises ProtocolError.

        A loop that has other work polls with ``timeout=0`` between its pieces of work and
        blocks with ``timeout=None`` when it has none: one thread, no hand-over to wake it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        came = False
        while not self._ready and self._read(None if deadline is None else deadline - time.monotonic()):
            came = True
        while came and self._read(0):  # the rest of what is already there: a full chunk may not be all of it
            pass
        if not self._ready:
            return None if self._ended else []
        messages = list(self._ready)
        self._ready.clear()
        return messages

    def __iter__(self) -> Iterator[T]:
        while (message := self.receive()) is not None:
            yield message


class AsyncReceiver(Generic[T]):
    """Messages read from an anyio byte stream (a child's stdout)."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, codec: Codec[T]) -> None:
        import anyio

        self.stream = stream
        self.codec = codec
        self._ended = (anyio.EndOfStream, anyio.ClosedResourceError)
        self._buffer = bytearray()
        self._ready: list[T] = []

    async def receive_all(self) -> list[T] | None:
        """Every message that has arrived, at least one; None at a clean end of stream.

        One receive takes whatever the pipe holds (a runner writes a decode step's messages
        for every sequence at once), not two receives per message. Raises ProtocolError.
        """
        while not self._ready:
            try:
                chunk = await self.stream.receive(CHUNK)
            except self._ended:
                if self._buffer:
                    raise ProtocolError("stream ended inside a frame") from None
                return None
            self._buffer += chunk
            self._ready = self.codec.parse(self._buffer)
        messages, self._ready = self._ready, []
        return messages

    async def receive(self) -> T | None:
        """The next message; None at a clean end of stream. Raises ProtocolError."""
        if not self._ready:
            messages = await self.receive_all()
            if messages is None:
                return None
            self._ready = messages  # the rest wait for the next call
        return self._ready.pop(0)


# -- the parent's handle on a child -------------------------------------------------------------


class Child(Generic[T]):
    """A child speaking frames, for a parent that blocks (a thread): :meth:`send`,
    :meth:`receive` (``T`` messages), then :meth:`close`. Raises OSError when it cannot start."""

    def __init__(
        self, subcommand: str, codec: Codec[T], *, stderr: IO[bytes] | int | None = None, cwd: Path | None = None
    ) -> None:
        self.process = subprocess.Popen(
            command(subcommand),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=cwd,
            env=environment(),
            close_fds=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._sender = Sender(self.process.stdin)
        self._receiver = Receiver(self.process.stdout.fileno(), codec)

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: msgspec.Struct) -> None:
        """Raises OSError (BrokenPipeError: the child is gone) or ValueError (its input is closed)."""
        self._sender.send(message)

    def receive(self, timeout: float | None = None) -> T | None:
        """The child's next message, None at its end (see :meth:`Receiver.receive`)."""
        return self._receiver.receive(timeout)

    def __iter__(self) -> Iterator[T]:
        return iter(self._receiver)

    def close_input(self) -> None:
        """End the child's input, which asks it to exit; returns at once."""
        with contextlib.suppress(OSError):
            self._sender.out.close()

    def stop(self, grace: float) -> int:
        """End of input, ``grace`` seconds to exit, then SIGKILL; returns the exit status.

        Safe from another thread than the one that reads (which then reads the end of output).
        """
        self.close_input()
        try:
            return self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if grace > 0:
                log.warning("child pid %s did not exit %g s after its input ended; killing it", self.pid, grace)
            self.process.kill()
            return self.process.wait()

    def close(self, grace: float) -> int:
        """:meth:`stop`, then let go of its output (the reader's thread only)."""
        code = self.stop(grace)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


class AsyncChild(Generic[T]):
    """A child speaking frames, for an async parent: :meth:`start`, :meth:`send`,
    :attr:`receiver`, then :meth:`stop` (or :meth:`kill`). Its stderr is a pipe the caller reads."""

    def __init__(self, process: anyio.abc.Process, codec: Codec[T]) -> None:
        import anyio

        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.receiver = AsyncReceiver(process.stdout, codec)
        self._write_lock = anyio.Lock()

    @classmethod
    async def start(cls, subcommand: str, codec: Codec[T], *, cwd: Path | None = None) -> AsyncChild[T]:
        import anyio

        process = await anyio.open_process(
            command(subcommand),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=environment(),
        )
        return cls(process, codec)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, message: msgspec.Struct) -> None:
        """Raises OSError, BrokenResourceError or ClosedResourceError when the child is gone."""
        assert self.process.stdin is not None
        async with self._write_lock:
            await self.process.stdin.send(Codec.encode(message))

    async def stop(self, grace: float) -> None:
        """End of input, ``grace`` seconds to exit, then SIGKILL; not cancelled by its caller's scope."""
        import anyio

        with anyio.CancelScope(shield=True):
            if self.process.stdin is not None:
                with contextlib.suppress(OSError, anyio.BrokenResourceError):
                    await self.process.stdin.aclose()
            with anyio.move_on_after(grace):
                await self.process.wait()
                return
            log.warning("child pid %s did not exit %g s after its input ended; killing it", self.pid, grace)
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL unless it has exited, and wait for it; not cancelled by its caller's scope."""
        import anyio

        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
