"""Runner processes, seen from the API process: start, admit, route, unload.

:class:`RunnerProcess` is one child process with one model. It multiplexes
requests over the child's pipes by id; a reader task hands each incoming
message to the request it belongs to. When the child dies, every request in
flight ends with :class:`EngineUnavailable` and the next request for that
model starts a new runner.

:class:`ModelManager` keeps at most ``max_loaded_models`` runners (least
recently used goes first), unloads idle ones after ``model_idle_ttl`` seconds
and bounds how many requests may wait for a busy model (``queue_size``).
"""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from locopilot.engine import protocol
from locopilot.engine.protocol import (
    Cancel,
    Done,
    Embed,
    Embeddings,
    Failed,
    FromRunner,
    Generate,
    Load,
    LoadFailed,
    Ready,
)
from locopilot.errors import EngineUnavailable, QueueFull
from locopilot.settings import Settings

log = logging.getLogger(__name__)

TERMINAL = (Done, Failed, Embeddings)


def runner_command() -> list[str]:
    """How to start a runner: the same program, hidden subcommand ``_runner``."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "_runner"]
    return [sys.executable, "-m", "locopilot", "_runner"]


class RunnerProcess:
    """One runner child. Created by :meth:`start`; ended by :meth:`stop` or by dying."""

    def __init__(self, name: str, process: anyio.abc.Process, ready: Ready, clock: Callable[[], float]) -> None:
        self.name = name
        self.process = process
        self.ready = ready
        self.clock = clock
        self.last_used = clock()
        self.in_flight = 0
        self.waiting = 0
        self.tokens_generated = 0
        self.alive = True
        self.exit_reason = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, MemoryObjectSendStream[FromRunner]] = {}
        self._write_lock = anyio.Lock()
        # One request at a time inside the runner for now; the runner's queue is ours.
        self._slot = anyio.Semaphore(1)

    @classmethod
    async def start(cls, name: str, model_path: Path, settings: Settings, clock: Callable[[], float]) -> RunnerProcess:
        """Spawn a runner and load the model; raises EngineUnavailable if it cannot."""
        load = Load(
            model_path=str(model_path),
            ctx_size=settings.ctx_size,
            threads=settings.effective_threads(),
            gpu_layers=settings.gpu_layers,
        )
        process = await anyio.open_process(runner_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            await process.stdin.send(protocol.encode(load))
            with anyio.fail_after(settings.load_timeout):
                first = await _read_message(process.stdout)
        except (TimeoutError, OSError, anyio.BrokenResourceError, protocol.ProtocolError) as exc:
            await _kill(process)
            raise EngineUnavailable(f"model '{name}' did not load: {type(exc).__name__} {exc}".strip()) from exc
        match first:
            case Ready():
                log.info("loaded model %s in runner pid %s (n_ctx=%s)", name, first.pid, first.n_ctx)
                return cls(name, process, first, clock)
            case LoadFailed(message=message):
                await _kill(process)
                raise EngineUnavailable(f"model '{name}' failed to load: {message}")
            case None:
                code = await process.wait()
                raise EngineUnavailable(f"model '{name}' failed to load: the runner exited with code {code}")
            case _:
                await _kill(process)
                raise EngineUnavailable(f"model '{name}' failed to load: unexpected {type(first).__name__}")

    async def read_loop(self) -> None:
        """Route messages to their requests until the child's stdout ends."""
        assert self.process.stdout is not None
        try:
            while (message := await _read_message(self.process.stdout)) is not None:
                if isinstance(message, Done):
                    # Counted here too for requests whose reader has gone (cancelled ones).
                    self.tokens_generated += message.completion_tokens
                sender = self._pending.get(getattr(message, "id", -1))
                if sender is not None:
                    sender.send_nowait(message)
        except (OSError, anyio.BrokenResourceError, protocol.ProtocolError) as exc:
            log.warning("runner for %s: %s", self.name, exc)
        finally:
            self.alive = False
            with anyio.CancelScope(shield=True):
                code = await self.process.wait()
            self.exit_reason = f"the runner for model '{self.name}' exited with code {code}"
            if self._pending:
                log.error("%s with %d requests in flight", self.exit_reason, len(self._pending))
            for sender in list(self._pending.values()):
                sender.close()

    @asynccontextmanager
    async def admit(self, queue_size: int) -> AsyncIterator[None]:
        """Hold the runner's slot for one request; QueueFull when too many already wait."""
        if self._slot.value == 0 and self.waiting >= queue_size:
            raise QueueFull(
                f"model '{self.name}' is busy and {self.waiting} requests are already waiting; try again shortly",
                retry_after=1,
            )
        self.waiting += 1
        try:
            await self._slot.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.last_used = self.clock()
            self._slot.release()

    async def request(self, job: Generate | Embed) -> AsyncGenerator[FromRunner, None]:
        """Send one job and yield its messages up to and including the terminal one.

        Closing the iterator early sends Cancel to the runner. Raises
        EngineUnavailable if the runner dies first.
        """
        if not self.alive:
            raise EngineUnavailable(self.exit_reason or f"the runner for model '{self.name}' has stopped")
        send, receive = anyio.create_memory_object_stream[FromRunner](math.inf)
        self._pending[job.id] = send
        finished = False
        try:
            await self._send(job)
            async with receive:
                async for message in receive:
                    finished = isinstance(message, TERMINAL)
                    yield message
                    if finished:
                        return
            raise EngineUnavailable(f"{self.exit_reason or 'the runner stopped'}; the request was not completed")
        finally:
            del self._pending[job.id]
            send.close()
            if not finished and self.alive:
                with anyio.CancelScope(shield=True):
                    await self._send(Cancel(id=job.id))

    def next_id(self) -> int:
        return next(self._ids)

    async def _send(self, message: protocol.ToRunner) -> None:
        assert self.process.stdin is not None
        try:
            async with self._write_lock:
                await self.process.stdin.send(protocol.encode(message))
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self.alive = False
            raise EngineUnavailable(f"the runner for model '{self.name}' is gone: {exc}") from exc

    async def stop(self) -> None:
        """End the process (closing stdin asks it to exit; kill if it does not)."""
        self.alive = False
        with anyio.CancelScope(shield=True):
            if self.process.stdin is not None:
                await self.process.stdin.aclose()
            with anyio.move_on_after(5):
                await self.process.wait()
                return
            await _kill(self.process)


async def _read_message(stream: anyio.abc.ByteReceiveStream) -> FromRunner | None:
    header = await _receive_exact(stream, 4)
    if header is None:
        return None
    body = await _receive_exact(stream, protocol.frame_length(header))
    if body is None:
        raise protocol.ProtocolError("runner output ended inside a frame")
    return protocol.decode_from_runner(body)


async def _receive_exact(stream: anyio.abc.ByteReceiveStream, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        try:
            chunk = await stream.receive(size - len(buffer))
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if buffer:
                raise protocol.ProtocolError("runner output ended inside a frame") from None
            return None
        buffer += chunk
    return bytes(buffer)


async def _kill(process: anyio.abc.Process) -> None:
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        await process.wait()


class RunnerInfo(msgspec.Struct, frozen=True):
    model: str
    pid: int
    alive: bool
    n_ctx: int
    chat_template: str
    in_flight: int
    waiting: int
    tokens_generated: int
    idle_seconds: float


class ModelManager:
    """Loads models into runners on demand and keeps the set within limits.

    Runs its background tasks (readers, idle reaper) in ``task_group``, which
    the app's lifespan owns. ``paths`` maps a model name to its GGUF file and
    raises ModelNotFound for an unknown one.
    """

    def __init__(
        self,
        settings: Settings,
        paths: Callable[[str], Path],
        task_group: anyio.abc.TaskGroup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.task_group = task_group
        self.clock = clock
        self.runners: OrderedDict[str, RunnerProcess] = OrderedDict()
        self._loading: dict[str, anyio.Lock] = {}

    def loaded(self) -> list[str]:
        return [name for name, runner in self.runners.items() if runner.alive]

    def describe(self) -> list[RunnerInfo]:
        return [
            RunnerInfo(
                model=name,
                pid=runner.ready.pid,
                alive=runner.alive,
                n_ctx=runner.ready.n_ctx,
                chat_template=runner.ready.template,
                in_flight=runner.in_flight,
                waiting=runner.waiting,
                tokens_generated=runner.tokens_generated,
                idle_seconds=round(self.clock() - runner.last_used, 3),
            )
            for name, runner in self.runners.items()
        ]

    async def runner(self, name: str) -> RunnerProcess:
        """The live runner for ``name``, starting one (and evicting another) if needed."""
        path = self.paths(name)
        lock = self._loading.setdefault(name, anyio.Lock())
        async with lock:
            runner = self.runners.get(name)
            if runner is not None and not runner.alive:
                del self.runners[name]
                runner = None
            if runner is None:
                await self._make_room()
                runner = await RunnerProcess.start(name, path, self.settings, self.clock)
                self.runners[name] = runner
                self.task_group.start_soon(runner.read_loop, name=f"runner-reader:{name}")
            self.runners.move_to_end(name)
            runner.last_used = self.clock()
            return runner

    async def _make_room(self) -> None:
        while len(self.runners) >= self.settings.max_loaded_models:
            idle = [name for name, r in self.runners.items() if r.in_flight == 0 and r.waiting == 0]
            if not idle:
                raise QueueFull(
                    f"all {len(self.runners)} loaded models are busy; raise LOCOPILOT_MAX_LOADED_MODELS "
                    "or try again shortly",
                    retry_after=2,
                )
            await self.unload(idle[0])

    async def unload(self, name: str) -> bool:
        runner = self.runners.pop(name, None)
        if runner is None:
            return False
        log.info("unloading model %s", name)
        await runner.stop()
        return True

    async def reap_idle(self, interval: float = 1.0) -> None:
        """Forever: unload runners idle longer than the TTL, forget dead ones."""
        ttl = self.settings.model_idle_ttl
        while True:
            await anyio.sleep(interval)
            now = self.clock()
            for name, runner in list(self.runners.items()):
                if not runner.alive and runner.in_flight == 0:
                    self.runners.pop(name, None)
                elif ttl >= 0 and runner.in_flight == 0 and runner.waiting == 0 and now - runner.last_used > ttl:
                    await self.unload(name)

    async def aclose(self) -> None:
        for name in list(self.runners):
            await self.unload(name)
