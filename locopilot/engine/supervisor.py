"""Runner processes, seen from the API process: start, admit, route, unload.

:class:`RunnerProcess` is one child process with one model. It multiplexes
requests over the child's pipes by id; a reader task hands each incoming
message to the request it belongs to. When the child dies, every request in
flight ends with :class:`EngineUnavailable` and the next request for that
model starts a new runner.

:class:`ModelManager` keeps at most ``max_loaded_models`` runners (least
recently used goes first), unloads idle ones after ``model_idle_ttl`` seconds
(or the time a request set for that model, Ollama's ``keep_alive``: :meth:`ModelManager.keep`)
and bounds how many requests may wait for a busy model (``queue_size``).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from locopilot.children import AsyncChild, ProtocolError, command
from locopilot.engine import protocol
from locopilot.engine.protocol import (
    Cancel,
    Count,
    Counted,
    Delta,
    Done,
    Embed,
    Embeddings,
    Failed,
    FromRunner,
    Generate,
    Load,
    LoadFailed,
    Ready,
    Tuned,
)
from locopilot.engine.templates import FALLBACKS
from locopilot.errors import EngineUnavailable, InsufficientMemory, InvalidRequest, LocopilotError, QueueFull
from locopilot.models.gguf import GGUFError
from locopilot.models.memory import Estimate, available, estimate, gib, model_header
from locopilot.settings import Settings

log = logging.getLogger(__name__)

TERMINAL = (Done, Failed, Embeddings, Counted)


def probe_command(backends_dir: str) -> list[str]:
    """``_runner --probe``: llama.cpp's version, devices and GPUs as JSON (runner.probe)."""
    return [*command("_runner"), "--probe", *(["--backends-dir", backends_dir] if backends_dir else [])]


runner_log = logging.getLogger("locopilot.runner")

#: A runner line longer than this is logged in pieces.
MAX_LOG_LINE = 16384


async def relay_stderr(stream: anyio.abc.ByteReceiveStream, model: str, pid: int) -> None:
    """Log each line a runner writes on stderr (llama.cpp's errors, Python's warnings and
    tracebacks) as a record of ours, so the server's log stays one JSON object a line."""

    def emit(raw: bytes) -> None:
        if text := raw.decode(errors="replace").rstrip():
            runner_log.warning("%s", text, extra={"event": "runner", "model": model, "pid": pid})

    pending = b""
    try:
        async for chunk in stream:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                emit(line)
            while len(pending) > MAX_LOG_LINE:
                emit(pending[:MAX_LOG_LINE])
                pending = pending[MAX_LOG_LINE:]
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the runner is gone; what it wrote last is below
    emit(pending)


def _template_override(choice: str | None) -> dict[str, Any]:
    """The Load fields of a per-model chat template: a fallback by name, or a file's text (read now)."""
    if choice is None:
        return {}
    if choice in FALLBACKS:
        source, stop = FALLBACKS[choice]
        return {"template_name": choice, "template_source": source, "template_stop": stop}
    try:
        return {"template_name": "file", "template_source": Path(choice).read_text()}
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineUnavailable(f"cannot read the chat template {choice}: {exc}") from exc


#: (device, inode, size, mtime_ns) of a model file: a replaced or rewritten file has another.
FileKey = tuple[int, int, int, int]


def file_key(path: Path) -> FileKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class RunnerGone(EngineUnavailable):
    """The runner had died before this request was sent; a new runner may serve it."""


class _Ticket:
    """One request's hold on the runner's slots (one per choice), given back exactly once."""

    def __init__(self, runner: RunnerProcess, send: MemoryObjectSendStream[FromRunner], slots: int = 1) -> None:
        self.runner = runner
        self.send = send
        self.slots = slots
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.runner.in_flight -= 1
            self.runner.last_used = self.runner.clock()
            for _ in range(self.slots):
                self.runner._slot.release()
            if self.runner.in_flight == 0:
                self.runner.on_idle()


class RunnerProcess:
    """One runner child. Created by :meth:`start`; ended by :meth:`stop` or by dying."""

    def __init__(
        self,
        name: str,
        child: AsyncChild[FromRunner],
        ready: Ready,
        clock: Callable[[], float],
        on_idle: Callable[[], None] = lambda: None,
        load_seconds: float = 0.0,
    ) -> None:
        self.name = name
        self.on_idle = on_idle
        self.child = child
        self.ready = ready
        self.clock = clock
        self.last_used = clock()
        self.loaded_at = self.last_used
        self.load_seconds = load_seconds
        """How long starting the process and loading the model took."""
        self.in_flight = 0
        self.waiting = 0
        self.tokens_generated = 0
        self.cached_tokens = 0
        self.embedding_decodes = 0
        self.threads = ready.threads
        """llama.cpp's threads for a one-token step, and why (the runner measures them: ``Tuned``)."""
        self.threads_reason = ready.threads_reason
        self.alive = True
        self.weights = 0
        """The estimated bytes of its model's weights (mapped from the file, so counted as page cache)."""
        self.file_key: FileKey | None = None
        """The model file's identity when it was loaded (:func:`file_key`)."""
        self.exit_reason = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, _Ticket] = {}
        # As many requests in the runner as it has slots; the queue behind them is ours.
        self._slot = anyio.Semaphore(ready.slots)
        # A request for n choices takes n slots, one at a time: one such request gathers at once,
        # so two cannot each hold part of what the other waits for.
        self._gathering = anyio.Lock()

    @classmethod
    async def start(
        cls,
        name: str,
        model_path: Path,
        settings: Settings,
        clock: Callable[[], float],
        tasks: anyio.abc.TaskGroup,
        on_idle: Callable[[], None] = lambda: None,
    ) -> RunnerProcess:
        """Spawn a runner and load the model; raises EngineUnavailable if it cannot.

        The runner's stderr is relayed into our log by a task in ``tasks`` until it closes.
        """
        runtime = settings.for_model(name)
        load = Load(
            model_path=str(model_path),
            ctx_size=runtime.ctx_size,
            threads=runtime.threads,
            decode_threads=runtime.decode_threads,
            gpu_layers=runtime.gpu_layers,
            parallel=runtime.parallel,
            prompt_cache_dir=str(settings.prompt_cache_path) if settings.prompt_cache_mb else "",
            prompt_cache_bytes=settings.prompt_cache_mb * 1024 * 1024,
            prompt_cache_min_tokens=settings.prompt_cache_min_tokens,
            backends_dir=settings.backends_dir,
            **_template_override(runtime.chat_template),
        )
        child = await AsyncChild.start("_runner", protocol.from_runner, cwd=settings.data_path)
        process = child.process
        assert process.stderr is not None
        tasks.start_soon(relay_stderr, process.stderr, name, child.pid, name=f"runner-stderr:{name}")
        failed = f"model '{name}' failed to load; the server log says why"
        started = clock()
        try:
            await child.send(load)
            with anyio.fail_after(settings.load_timeout):
                first = await child.receiver.receive()
        except (TimeoutError, OSError, anyio.BrokenResourceError, ProtocolError) as exc:
            await child.kill()
            log.error("runner for %s did not load: %r", name, exc)
            raise EngineUnavailable(failed) from exc
        except BaseException:
            await child.kill()
            raise
        match first:
            case Ready():
                log.info("loaded model %s in runner pid %s (n_ctx=%s)", name, first.pid, first.n_ctx)
                return cls(name, child, first, clock, on_idle, load_seconds=clock() - started)
            case LoadFailed(message=message):
                log.error("model %s failed to load: %s", name, message)
            case None:
                log.error("model %s failed to load: the runner exited with code %s", name, await process.wait())
            case _:
                log.error("model %s failed to load: the runner sent %s", name, type(first).__name__)
        await child.kill()
        raise EngineUnavailable(failed)

    async def read_loop(self) -> None:
        """Route messages to their requests until the child's stdout ends."""
        receiver = self.child.receiver
        try:
            while (messages := await receiver.receive_all()) is not None:
                for message in messages:
                    self._route(message)
        except (OSError, anyio.BrokenResourceError, ProtocolError) as exc:
            log.warning("runner for %s: %s", self.name, exc)
        finally:
            self.alive = False
            # A runner that sent garbage may still be alive; it is of no use now.
            await self.child.kill()
            self.exit_reason = f"the runner for model '{self.name}' exited with code {self.child.process.returncode}"
            if self._pending:
                log.error("%s with %d requests in flight", self.exit_reason, len(self._pending))
            for ticket in list(self._pending.values()):
                ticket.send.close()

    def _route(self, message: FromRunner) -> None:
        if isinstance(message, Done):
            # Counted here too for requests whose reader has gone (cancelled ones).
            self.tokens_generated += message.completion_tokens
            self.cached_tokens += message.cached_tokens
        elif isinstance(message, Embeddings):
            self.embedding_decodes += message.decodes
        elif isinstance(message, Tuned):
            self.threads, self.threads_reason = message.threads, message.reason
            log.info("runner for %s: %d threads for one-token steps, %s", self.name, message.threads, message.reason)
            return
        ticket = self._pending.get(getattr(message, "id", -1))
        if ticket is not None:
            if isinstance(message, TERMINAL):
                # The runner is done with it: the next request may go, even
                # while this one's client is still reading what was sent.
                ticket.release()
            ticket.send.send_nowait(message)

    async def request(self, job: Generate | Embed | Count, queue_size: int) -> AsyncGenerator[FromRunner, None]:
        """Wait for the runner's slot, send one job, yield its messages through the terminal one.

        Raises QueueFull (nothing waits) when ``queue_size`` requests already
        wait, RunnerGone when the runner died while this one waited, and
        EngineUnavailable when it dies during the job. Closing the iterator
        early sends Cancel to the runner. Deltas that arrived while the caller
        was busy come as one (see :func:`_coalesced`). The slot is given back as soon as the
        runner finishes the job, or at once when the job is abandoned.
        """
        slots = job.n if isinstance(job, Generate) else 1
        if slots > self.ready.slots:
            raise InvalidRequest(
                f"n={slots} asks for more choices than model '{self.name}' generates at once "
                f"({self.ready.slots}, LOCOPILOT_PARALLEL); each choice takes one of its slots.",
                param="n",
            )
        if self._slot.value < slots and self.waiting >= queue_size:
            raise QueueFull(
                f"model '{self.name}' is busy and {self.waiting} requests are already waiting; try again shortly",
                retry_after=1,
            )
        self.waiting += 1
        try:
            await self._acquire(slots)
        finally:
            self.waiting -= 1
        self.in_flight += 1
        send, receive = anyio.create_memory_object_stream[FromRunner](math.inf)
        ticket = _Ticket(self, send, slots)
        if not self.alive:
            ticket.release()
            raise RunnerGone(self.exit_reason or f"the runner for model '{self.name}' has stopped")
        self._pending[job.id] = ticket
        finished = False
        try:
            await self._send(job)
            async with receive:
                async for message in _coalesced(receive):
                    finished = isinstance(message, TERMINAL)
                    yield message
                    if finished:
                        return
            raise EngineUnavailable(f"{self.exit_reason or 'the runner stopped'}; the request was not completed")
        finally:
            del self._pending[job.id]
            send.close()
            ticket.release()
            if not finished and self.alive:
                with anyio.CancelScope(shield=True):
                    await self._send(Cancel(id=job.id))

    async def _acquire(self, slots: int) -> None:
        if slots == 1:
            await self._slot.acquire()
            return
        taken = 0
        try:
            async with self._gathering:
                while taken < slots:
                    await self._slot.acquire()
                    taken += 1
        except BaseException:
            for _ in range(taken):
                self._slot.release()
            raise

    def next_id(self) -> int:
        return next(self._ids)

    async def _send(self, message: protocol.ToRunner) -> None:
        try:
            await self.child.send(message)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self.alive = False
            raise EngineUnavailable(f"the runner for model '{self.name}' is gone: {exc}") from exc

    async def stop(self) -> None:
        """End the process (closing stdin asks it to exit; kill if it does not in 5 s)."""
        self.alive = False
        await self.child.stop(5)


async def _coalesced(receive: MemoryObjectReceiveStream[FromRunner]) -> AsyncGenerator[FromRunner, None]:
    """``receive``'s messages, with Deltas that are already waiting merged into one.

    A reader that keeps up gets every token as it comes; one that fell behind
    (the API process and llama.cpp share the CPU) gets what piled up as one
    Delta, so it does the per-chunk work (SSE event, write) once, not per token.
    """
    async for message in receive:
        while isinstance(message, Delta):
            try:
                following = receive.receive_nowait()
            except anyio.WouldBlock:
                break
            except anyio.EndOfStream:
                yield message
                return
            if isinstance(following, Delta) and following.index == message.index:
                message = Delta(
                    id=message.id,
                    text=message.text + following.text,
                    tokens=message.tokens + following.tokens,
                    index=message.index,
                    logprobs=message.logprobs + following.logprobs,
                )
            else:  # another choice's text, or not text
                yield message
                message = following
        yield message


class RunnerInfo(msgspec.Struct, frozen=True):
    model: str
    pid: int
    alive: bool
    n_ctx: int
    chat_template: str
    slots: int
    threads: int
    """llama.cpp's threads for a step of one token; ``threads_batch`` for larger ones."""
    threads_reason: str
    """Why ``threads``: measured (with the times), set, or one core."""
    threads_batch: int
    in_flight: int
    waiting: int
    tokens_generated: int
    cached_tokens: int
    embedding_decodes: int
    idle_seconds: float
    gpu_layers: int = 0
    """Layers on the GPUs (0 on a CPU-only machine); ``offload`` says where and why that many."""
    offload: str = ""


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
        free_memory: Callable[[], int | None] = available,
    ) -> None:
        self.settings = settings
        self.free_memory = free_memory
        self.paths = paths
        self.task_group = task_group
        self.clock = clock
        self.runners: OrderedDict[str, RunnerProcess] = OrderedDict()
        # One load at a time: it keeps MAX_LOADED_MODELS true while loads overlap
        # (a model being loaded is not in `runners` yet), and loads share the CPU anyway.
        self._loading = anyio.Lock()
        self._some_idle = anyio.Event()
        self._died: set[str] = set()
        self.keep_alive: dict[str, float] = {}
        """Seconds a model's runner may sit idle, by model, where a request set it (Ollama's
        ``keep_alive``) for the model's current load; negative keeps it loaded. Else ``model_idle_ttl``."""
        self.restarts: Counter[str] = Counter()
        """Since start, by model: runners started after the model's previous runner died."""

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
                slots=runner.ready.slots,
                threads=runner.threads,
                threads_reason=runner.threads_reason,
                threads_batch=runner.ready.threads_batch,
                gpu_layers=runner.ready.gpu_layers,
                offload=runner.ready.offload,
                in_flight=runner.in_flight,
                waiting=runner.waiting,
                tokens_generated=runner.tokens_generated,
                cached_tokens=runner.cached_tokens,
                embedding_decodes=runner.embedding_decodes,
                idle_seconds=round(self.clock() - runner.last_used, 3),
            )
            for name, runner in self.runners.items()
        ]

    async def runner(self, name: str) -> RunnerProcess:
        """The live runner for ``name``, starting one (and evicting another) if needed."""
        path = self.paths(name)
        key = file_key(path)
        runner = self.runners.get(name)
        if runner is not None and runner.alive and runner.file_key == key:
            self.runners.move_to_end(name)
            runner.last_used = self.clock()
            return runner
        async with self._loading:
            runner = self.runners.get(name)
            if runner is not None and not runner.alive:
                self._forget_dead(name)
                runner = None
            if runner is not None and runner.file_key != key:
                # The file was replaced (a pull updated it, someone copied over it): serve the new one.
                log.info("model %s changed on disk; reloading it", name)
                await self.unload(name)
                runner = None
            if runner is None:
                await self._make_room()
                need = await self._check_memory(name, path)
                runner = await RunnerProcess.start(
                    name, path, self.settings, self.clock, self.task_group, self._runner_idle
                )
                runner.file_key = key
                runner.weights = need.weights if need is not None else 0
                self.runners[name] = runner
                if name in self._died:
                    self._died.discard(name)
                    self.restarts[name] += 1
                self.task_group.start_soon(runner.read_loop, name=f"runner-reader:{name}")
            self.runners.move_to_end(name)
            runner.last_used = self.clock()
            return runner

    async def _make_room(self) -> None:
        """Unload the least recently used idle runner until one more fits; waits while all are busy."""
        while len(self.runners) >= self.settings.max_loaded_models:
            idle = [
                name
                for name, r in self.runners.items()
                if r.in_flight == 0 and r.waiting == 0 and not self.settings.for_model(name).keep_loaded
            ]
            if idle:
                await self.unload(idle[0])
                continue
            self._some_idle = anyio.Event()
            with anyio.move_on_after(self.settings.load_timeout) as waited:
                await self._some_idle.wait()
            if waited.cancelled_caught:
                raise QueueFull(
                    f"all {len(self.runners)} loaded models stayed busy for {self.settings.load_timeout} s; "
                    "raise LOCOPILOT_MAX_LOADED_MODELS or try again later",
                    retry_after=5,
                )

    async def _check_memory(self, name: str, path: Path) -> Estimate | None:
        """Unload idle models until ``name`` fits in free memory, or raise InsufficientMemory (nothing is started).

        Free is what the machine or cgroup has available (:func:`locopilot.models.memory.available`) less the
        weights of loaded models, whose mapped pages it counts as reclaimable. None: no estimate could be made.
        """
        try:
            header = await anyio.to_thread.run_sync(model_header, path)
        except (GGUFError, OSError, LocopilotError):
            return None  # the runner says what is wrong with the file
        need = estimate(header, self.settings.for_model(name))
        while True:
            available = self.free_memory()
            if available is None:
                return need
            free = max(0, available - sum(r.weights for r in self.runners.values() if r.alive))
            if need.total <= free:
                return need
            idle = [
                other
                for other, r in self.runners.items()
                if r.in_flight == 0 and r.waiting == 0 and not self.settings.for_model(other).keep_loaded
            ]
            if not idle:
                log.warning("model %s needs about %s, %s is free: refused", name, gib(need.total), gib(free))
                raise InsufficientMemory(
                    f"model '{name}' needs about {gib(need.total)} of memory (weights {gib(need.weights)}, "
                    f"KV cache {gib(need.kv_cache)}, compute {gib(need.compute)}), and {gib(free)} is free"
                    + (f" with {len(self.runners)} other models loaded" if self.runners else "")
                    + "; lower its LOCOPILOT_CTX_SIZE or LOCOPILOT_PARALLEL, or use a smaller quantization",
                    param="model",
                )
            log.info("unloading %s to make room for %s", idle[0], name)
            await self.unload(idle[0])

    def _forget_dead(self, name: str) -> None:
        """Drop a runner that died (an unloaded one has left ``runners`` before it stops)."""
        del self.runners[name]
        self._died.add(name)

    def _runner_idle(self) -> None:
        self._some_idle.set()

    def idle_ttl(self, name: str) -> float:
        """Seconds ``name``'s runner may sit idle before it is unloaded; negative: forever."""
        return self.keep_alive.get(name, self.settings.for_model(name).idle_ttl)

    def keep(self, name: str, seconds: float | None) -> None:
        """Keep ``name`` loaded ``seconds`` after its last request (negative: until evicted or
        unloaded); None goes back to ``model_idle_ttl``. The reaper applies it within a second."""
        if seconds is None:
            self.keep_alive.pop(name, None)
        else:
            self.keep_alive[name] = seconds

    async def expire(self, name: str) -> bool:
        """Unload ``name`` now if it is idle, else as soon as its requests are done; whether it was loaded."""
        runner = self.runners.get(name)
        if runner is None:
            return False
        self.keep_alive[name] = 0
        if runner.in_flight == 0 and runner.waiting == 0:
            await self.unload(name)
        return True

    async def unload(self, name: str) -> bool:
        runner = self.runners.pop(name, None)
        self.keep_alive.pop(name, None)
        if runner is None:
            return False
        log.info("unloading model %s", name)
        await runner.stop()
        return True

    async def reap_idle(self, interval: float = 1.0) -> None:
        """Forever: unload runners idle longer than their TTL (:meth:`idle_ttl`), forget dead ones."""
        while True:
            await anyio.sleep(interval)
            now = self.clock()
            for name, runner in list(self.runners.items()):
                ttl = self.idle_ttl(name)
                if not runner.alive and runner.in_flight == 0:
                    self._forget_dead(name)
                elif ttl >= 0 and runner.in_flight == 0 and runner.waiting == 0 and now - runner.last_used > ttl:
                    await self.unload(name)

    async def aclose(self) -> None:
        for name in list(self.runners):
            await self.unload(name)
