"""The server's training queue: jobs run one worker process each, ``LOCOPILOT_TRAINING_CONCURRENCY`` at once.

A job's life, all of it in its ``training_jobs`` row and its events (:mod:`locopilot.store.jobs`):

1. :meth:`JobService.submit` checks the request (the base model exists and is readable, the
   file exists and is a fine-tuning dataset, the hyperparameters are in range: a 400 or 404
   otherwise, before any work), stores the row as ``queued`` and queues it.
2. A runner task takes it (oldest first), marks it ``running`` and starts a worker
   (``locopilot _train``, :mod:`locopilot.training.worker`) in a thread of its own. The worker's
   events become the job's events: ``metrics`` with step, loss, tokens/s and ETA, and messages.
   The worker refuses a dataset example longer than the context, naming its line.
3. Succeeded: the trained GGUF (in the job's work folder under ``<data>/training``) is moved
   into the models folder as ``<base>-ft-<8 hex of the job id>`` with its lineage manifest
   (:mod:`locopilot.training.lineage`), and is servable at once. Failed: ``error`` says why
   (the worker's own message, or its exit status and the last line of its log when it died).
4. :meth:`JobService.cancel`: a queued job is ``cancelled`` at once; a running one's worker has
   its input closed, on which it exits at once (killed :data:`CANCEL_KILL_S` seconds later if
   still there), and nothing is written.

A job that names an external ``framework`` (:mod:`locopilot.training.framework_jobs`) is checked
further at step 1, and at step 2 runs the framework's command instead of a worker, in a process
group of its own that a cancel ends whole (SIGTERM, then SIGKILL :data:`CANCEL_KILL_S` later); its
output goes to the job's log file, and its events say where that is, then how it ended (exit
status, the log's last lines). Step 3 converts its adapter to a GGUF LoRA adapter of the base,
published as a LoRA job's is. It has no checkpoints: a restart fails it (``interrupted``).

Restarts. A running job saves its weights every ``checkpoint_steps`` steps into
``<data>/training/checkpoints/<job id>`` (:class:`~locopilot.training.trainer.Checkpoints`).
At startup jobs still ``running`` that have a checkpoint are queued again and resume from it
(their events say so); those without one are marked failed (``interrupted``) by
:func:`locopilot.store.upkeep.fail_interrupted_jobs`. ``queued`` jobs are queued again: they
never started, so running them is what their submitter asked for. :meth:`JobService.aclose`
(the server's stop) stops every worker; a job with a checkpoint goes back to ``queued`` for the
next start, one without fails (``interrupted``). A worker whose server was killed sees its
stdin close and exits at once, so no worker outlives its server. A job's checkpoints are
removed when it ends (succeeded, failed or cancelled).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from msgspec import Meta

from locopilot.errors import InvalidRequest, LocopilotError, NotFound
from locopilot.models.catalog import ModelCatalog
from locopilot.models.gguf import GGUFError
from locopilot.schemas.training import JobInfo, LogEvent
from locopilot.settings import Settings, UpstreamConfig
from locopilot.store import files as stored_files
from locopilot.store import jobs as store
from locopilot.store.db import Database
from locopilot.store.files import StoredFile
from locopilot.store.jobs import TrainingJob
from locopilot.training import framework_jobs, lineage
from locopilot.training.adapters import FRAMEWORKS
from locopilot.training.adapters.base import plain
from locopilot.training.hyperparameters import (
    BUILTIN_ONLY,
    DEFAULT_CONTEXT,
    FIELDS,
    GATE_THRESHOLDS,
    FileId,
    Framework,
    Hyperparameters,
    ModelName,
    RemoteName,
    lora_values,
)
from locopilot.training.lora import AdapterError
from locopilot.training.publishing import gate, move_into
from locopilot.training.remote import Remotes
from locopilot.training.trainer import (
    Checkpointed,
    Checkpoints,
    Finished,
    Progress,
    Started,
    TrainConfig,
    TrainingRefused,
)

log = logging.getLogger(__name__)

#: A running job asked to cancel is killed this long after, if its current chunk has not ended.
CANCEL_KILL_S = 5.0
#: How long a cancel request waits for a running job to stop before answering.
CANCEL_WAIT_S = CANCEL_KILL_S + 3.0
FINE_TUNE_PURPOSE = "fine-tune"
#: Lines of a framework's log kept in its job's last events.
FRAMEWORK_LOG_TAIL = 20
#: How often a framework's log is read for the steps it reports.
FRAMEWORK_POLL_S = 1.0
#: What a framework's job takes besides its base: the hyperparameters that are not built-in only.
FRAMEWORK_FIELDS = tuple(name for name in FIELDS if name not in BUILTIN_ONLY and name != "seed")
HFFolder = Annotated[str, Meta(min_length=1, max_length=4096)]


class JobSpec(Hyperparameters, frozen=True, kw_only=True):
    """What a job trains, as both APIs ask for it (locopilot's takes this as its body); checked
    by :meth:`JobService.submit`.

    ``auto`` values are chosen when the job starts (:mod:`locopilot.training.auto`) and then
    stored in the row's ``params`` in their place, with ``chosen`` naming them.
    """

    model: ModelName
    """The base model: a model in the models folder."""
    training_file: FileId
    """A file uploaded with ``purpose=fine-tune``."""
    remote: RemoteName | None = None
    """Run the job on this upstream (another locopilot, kind openai) instead of here."""
    framework: Framework = "builtin"
    """Who trains: the built-in trainer (llama.cpp), or an external framework in the server's
    LOCOPILOT_TRAINING_PYTHON environment, which trains a LoRA adapter of ``hf_base``."""
    hf_base: HFFolder | None = None
    """With a framework: the base in Hugging Face form, a folder on the server (``config.json`` and
    safetensors); ``model`` is its GGUF, beside which the adapter is served."""

    def params(self) -> dict[str, Any]:
        """The hyperparameters as stored in the row and the lineage (the seed has a column of its own).
        A framework's: the values it runs with (:func:`lora_values`), and none of the built-in-only ones."""
        if self.framework != "builtin":
            values = lora_values(self)._asdict()
            return values | {name: getattr(self, name) for name in FRAMEWORK_FIELDS if name not in values}
        params = msgspec.structs.asdict(self.hyperparameters())
        del params["seed"]
        if params["lora_rank"] is None:
            del params["lora_rank"]
        return params


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def output_name(base_model: str, job_id: str) -> str:
    """``<base>-ft-<8 hex>``: the fine-tuned model's name in the models folder."""
    return f"{base_model}-ft-{job_id.removeprefix('ftjob-')[:8]}"


@dataclass
class _Running:
    """A job being run: its worker once started, and what has been asked of it."""

    job_id: str
    worker: Any = None  # TrainingWorker or a framework's FrameworkRun, set by the thread that starts it
    cancel_requested: bool = False
    stopping: bool = False  # the server is shutting down
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def signal_stop(self) -> None:
        """End the worker's input, on which it exits at once (a framework: SIGTERM to its process
        group); kill it CANCEL_KILL_S later if it has not. Blocks until it has exited."""
        with self.lock:
            worker = self.worker
        if worker is not None:
            worker.stop(CANCEL_KILL_S)


class JobService:
    """The queue and its runners; built in the app's lifespan, :meth:`run` in its task group."""

    def __init__(
        self, settings: Settings, db: Database, catalog: ModelCatalog, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self.clock = clock
        self.work_root = settings.data_path / "training"
        self._send, self._receive = anyio.create_memory_object_stream[str](math.inf)
        self._running: dict[str, _Running] = {}
        # Training threads run for hours: their own limiter, so they never hold anyio's shared one.
        self._threads = anyio.CapacityLimiter(settings.training_concurrency)
        self._closing = False
        self._tasks: TaskGroup | None = None
        self.remotes = Remotes()
        """The other locopilots jobs are sent to (see :mod:`locopilot.training.remote`)."""

    # -- the queue ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Queue the jobs left ``queued`` by the last run, then run jobs forever."""
        # Nothing runs yet: work folders left here are a killed server's.
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.work_root / "jobs", ignore_errors=True))
        await anyio.to_thread.run_sync(self._drop_stale_checkpoints)
        for job_id in await self.db.call(store.queued):
            self._send.send_nowait(job_id)
        # Its runners end when aclose closes the queue; then the queue's other end is closed too.
        with self._receive:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                for _ in range(self.settings.training_concurrency):
                    tasks.start_soon(self._runner)
                for job in await self.db.call(store.remote_unfinished):
                    tasks.start_soon(self._mirror, job)
                task_status.started()

    async def _runner(self) -> None:
        async for job_id in self._receive:
            if self._closing:
                return
            try:
                await self._run(job_id)
            except Exception:  # one job's bug must not stop the queue
                log.exception("training job %s failed unexpectedly", job_id)
                with contextlib.suppress(Exception):
                    await self._finish(job_id, "failed", error="internal error in the job service", code="internal")

    async def _run(self, job_id: str) -> None:
        started = self.clock()
        # Registered first, so a cancel that finds the row running also finds the job here.
        running = self._running[job_id] = _Running(job_id)
        if not await self.db.call(store.transition, job_id, ("queued",), status="running", started_at=started):
            self._running.pop(job_id, None)
            return  # cancelled while it waited
        try:
            await anyio.to_thread.run_sync(self._execute, job_id, running, limiter=self._threads)
        finally:
            running.done.set()
            self._running.pop(job_id, None)

    # -- requests ------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, key_id: str | None) -> TrainingJob:
        """Check ``spec`` and queue a job for it (see the module docstring).

        Raises:
            InvalidRequest: a hyperparameter out of range, a file that is not a fine-tuning dataset,
                a base model that cannot be trained.
            NotFound: no such file; ModelNotFound: no such base model.
        """
        config = self._config(spec, spec.model, Path("/"), Path("/"), Path("/"))
        try:
            config.check()
        except TrainingRefused as exc:
            raise InvalidRequest(str(exc), param="hyperparameters") from exc
        framework_jobs.check_request(spec.framework, spec.hf_base, spec)
        try:
            stored = await self.db.call(stored_files.get, spec.training_file)
        except NotFound as exc:
            raise NotFound(exc.message, param="training_file", code="file_not_found") from exc
        if stored.purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequest(
                f"File {stored.id} has purpose '{stored.purpose}', not '{FINE_TUNE_PURPOSE}'", param="training_file"
            )
        if spec.remote is not None:
            return await self._submit_remote(spec, stored, key_id)
        await anyio.to_thread.run_sync(self._check_base, spec.model)
        if spec.framework != "builtin":
            assert spec.hf_base is not None  # check_request
            await anyio.to_thread.run_sync(
                framework_jobs.check_here, spec.framework, spec.hf_base, spec.model, self.settings, self.catalog
            )
        job = self._queued(spec, stored, key_id)
        await self.db.call(store.insert, job)
        await self.db.call(store.add_event, job.id, job.created_at, f"Created fine-tuning job: {job.id}")
        # Closed once the server stops: the row stays queued and runs at the next start.
        with contextlib.suppress(anyio.ClosedResourceError):
            self._send.send_nowait(job.id)
        return job

    def _queued(
        self,
        spec: JobSpec,
        stored: StoredFile,
        key_id: str | None,
        remote: str | None = None,
        remote_job: str | None = None,
    ) -> TrainingJob:
        """The row of a new job for ``spec`` on ``stored`` (run by ``remote`` as ``remote_job``)."""
        return TrainingJob(
            id=new_job_id(),
            status="queued",
            framework="llama.cpp" if spec.framework == "builtin" else spec.framework,
            base_model=spec.model,
            hf_base=spec.hf_base,
            training_file=stored.id,
            dataset_path=stored.path,
            dataset_sha256=stored.sha256,
            params=spec.params(),
            seed=spec.seed,
            key_id=key_id,
            created_at=self.clock(),
            remote=remote,
            remote_job=remote_job,
        )

    def _upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.settings.upstream_configs:
            if upstream.name == name and upstream.kind == "openai":
                return upstream
        raise InvalidRequest(
            f"remote must name an upstream of kind openai (another locopilot) in LOCOPILOT_UPSTREAMS, not {name!r}",
            param="remote",
        )

    async def _submit_remote(self, spec: JobSpec, stored: StoredFile, key_id: str | None) -> TrainingJob:
        """Create the job on the remote (see :mod:`locopilot.training.remote`) and mirror it here."""
        upstream = self._upstream(spec.remote or "")
        body: dict[str, Any] = {"model": spec.model, "seed": spec.seed}
        if spec.framework == "builtin":
            body |= spec.params()
            if body["weight_decay"] == 0.0:
                del body["weight_decay"]  # a remote older than weight_decay in its schema refuses the name
        else:
            # As asked, for the remote to resolve and check (its own framework, its own folder).
            asked = {name: getattr(spec, name) for name in FRAMEWORK_FIELDS}
            body |= {"framework": spec.framework, "hf_base": spec.hf_base}
            body |= {name: value for name, value in asked.items() if value is not None}
        answer = await self.remotes.submit(upstream, Path(stored.path), stored.filename, body)
        job = self._queued(spec, stored, key_id, upstream.name, answer.id)
        await self.db.call(store.insert, job)
        message = f"Created fine-tuning job: {job.id}, running on {upstream.name} as {job.remote_job}"
        await self.db.call(store.add_event, job.id, job.created_at, message)
        if self._tasks is not None:
            self._tasks.start_soon(self._mirror, job)
        return job

    async def _mirror(self, job: TrainingJob) -> None:
        """Copy a remote job's events and outcome here until it ends; reconnect when its stream breaks.
        A remote that does not know the job (any more) fails it here, once."""
        upstream = self._upstream(job.remote or "")
        seen = await self.db.call(store.last_remote_event, job.id)
        running = job.status == "running"
        while not self._closing:
            try:
                async for event in self.remotes.follow(upstream, job.remote_job or "", seen):
                    match event:
                        case ("message" | "metrics") as kind, LogEvent() as logged:
                            seen = logged.id
                            running = await self._mirror_event(job, kind, logged, running)
                        case "end", JobInfo() as info:
                            await self._mirror_end(job, info)
                            return
            except NotFound as exc:
                log.warning("remote training job %s on %s: %s", job.remote_job, upstream.name, exc.message)
                await self._finish(job.id, "failed", error=exc.message, code="remote_job_not_found")
                return
            except LocopilotError as exc:
                log.warning("following remote training job %s on %s: %s", job.remote_job, upstream.name, exc.message)
            await anyio.sleep(5.0)

    async def _mirror_event(self, job: TrainingJob, kind: store.EventType, event: LogEvent, running: bool) -> bool:
        """Copy one remote event; whether the job is running here now."""
        details = {**(event.data or {}), "remote_event_id": event.id}
        level: store.EventLevel = event.level if event.level in ("info", "warn", "error") else "info"  # type: ignore[assignment]
        await self.db.call(store.add_event, job.id, self.clock(), event.message, level=level, type=kind, data=details)
        if kind == "metrics":
            await self.db.call(store.update, job.id, progress=float(details.get("progress", 0.0)))
        if not running and (kind == "metrics" or event.message == "Fine-tuning job started"):
            return await self.db.call(store.transition, job.id, ("queued",), status="running", started_at=self.clock())
        return running

    async def _mirror_end(self, job: TrainingJob, info: JobInfo) -> None:
        fields = {
            "status": info.status,
            "output_model": f"{job.remote}:{info.fine_tuned_model}" if info.fine_tuned_model else None,
            "output_sha256": info.output_sha256,
            "base_sha256": info.base_sha256,
            "trained_tokens": info.trained_tokens,
            "result": info.result,
            "progress": info.progress,
            "error": info.error.message if info.error else None,
            "error_code": info.error.code if info.error else None,
            "finished_at": self.clock(),
        }
        await self.db.call(store.transition, job.id, ("queued", "running"), **fields)

    def _check_base(self, model: str) -> None:
        """Raises ModelNotFound, InvalidModelName, or InvalidRequest for a base whose header does not parse."""
        try:
            self.catalog.header(model)
        except (GGUFError, OSError) as exc:
            raise InvalidRequest(f"The model '{model}' cannot be read: {exc}", param="model") from exc

    async def cancel(self, job_id: str) -> TrainingJob:
        """Cancel a queued or running job and return it as it then is; a finished one is returned as is.

        Raises NotFound.
        """
        job = await self.db.call(store.get, job_id)
        if job.remote is not None and not job.final:
            await self.remotes.cancel(self._upstream(job.remote), job.remote_job or "")
            with anyio.move_on_after(CANCEL_WAIT_S):
                # The remote's answer reaches this server through the job's mirror task.
                while not (job := await self.db.call(store.get, job_id)).final:  # noqa: ASYNC110
                    await anyio.sleep(0.3)
            return job
        if job.status == "queued" and await self.db.call(
            store.transition, job_id, ("queued",), status="cancelled", finished_at=self.clock()
        ):
            await self.db.call(store.add_event, job_id, self.clock(), "The job was cancelled before it started")
        elif (running := self._running.get(job_id)) is not None:
            running.cancel_requested = True
            await anyio.to_thread.run_sync(running.signal_stop)
            await anyio.to_thread.run_sync(running.done.wait, CANCEL_WAIT_S)
        return await self.db.call(store.get, job_id)

    async def aclose(self) -> None:
        """Stop every worker (their jobs fail as ``interrupted``); queued jobs stay queued."""
        self._closing = True
        self._send.close()
        running = list(self._running.values())
        async with anyio.create_task_group() as stopping:
            for job in running:
                job.stopping = True
                stopping.start_soon(anyio.to_thread.run_sync, job.signal_stop)
        with anyio.move_on_after(CANCEL_KILL_S + 2):
            for job in running:
                await anyio.to_thread.run_sync(job.done.wait, CANCEL_KILL_S + 2)
        await self.remotes.aclose()

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_dir(self, job_id: str) -> Path:
        return checkpoint_root(self.settings) / job_id

    def _drop_stale_checkpoints(self) -> None:
        """Checkpoints of jobs that are not waiting to resume (ended, or gone from the store)."""
        root = checkpoint_root(self.settings)
        if not root.is_dir():
            return
        waiting = set(store.queued(self.db))
        for folder in root.iterdir():
            if folder.name not in waiting:
                shutil.rmtree(folder, ignore_errors=True)

    def _requeue(self, job_id: str) -> bool:
        """Back to ``queued`` for the next start, if the job has a checkpoint to resume from."""
        step = checkpoint_step(self.checkpoint_dir(job_id))
        if step is None or not store.transition(self.db, job_id, ("running",), status="queued"):
            return False
        self._event(job_id, f"The server stopped; the job resumes from its checkpoint at step {step} at the next start")
        return True

    # -- one job, in its own thread ---------------------------------------------------

    def _config(self, hyper: Hyperparameters, model: str, base: Path, work: Path, output: Path) -> TrainConfig:
        return TrainConfig(
            **msgspec.structs.asdict(hyper.hyperparameters()),
            base_path=str(base),
            dataset_path=str(work / "dataset.jsonl"),
            output_path=str(output),
            work_dir=str(work),
            threads=self.settings.threads,
            base_name=model,
        )

    def _event(self, job_id: str, message: str, **kwargs: Any) -> None:
        store.add_event(self.db, job_id, self.clock(), message, **kwargs)

    def _execute(self, job_id: str, running: _Running) -> None:
        """Run the job to the end (the built-in trainer's worker, or a framework) and record how it
        ended. Blocks for the whole job."""
        job = store.get(self.db, job_id)
        work = self.work_root / "jobs" / job.id
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            base_path = Path(self.catalog.get(job.base_model).path).resolve()
            base_sha256 = lineage.sha256_file(base_path)
        except (OSError, NotFound, InvalidRequest) as exc:
            shutil.rmtree(work, ignore_errors=True)
            self._finish_sync(job.id, "failed", error=f"the base model cannot be read: {exc}", code="invalid_model")
            return
        store.update(self.db, job.id, base_sha256=base_sha256)
        self._event(job.id, "Fine-tuning job started")
        if running.cancel_requested or running.stopping:  # before its worker started: none is
            shutil.rmtree(work, ignore_errors=True)
            if running.stopping:
                if not self._requeue(job.id):
                    self._interrupted(job.id)
            else:
                self._finish_sync(job.id, "cancelled")
            return
        try:
            if job.framework in FRAMEWORKS:
                self._run_framework(job, running, base_path, base_sha256, work)
            else:
                self._run_builtin(job, running, base_path, base_sha256, work)
        except Exception as exc:
            log.exception("training job %s failed", job.id)
            self._finish_sync(job.id, "failed", error=f"{type(exc).__name__}: {exc}", code="internal")
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if store.get(self.db, job.id).final:
                shutil.rmtree(self.checkpoint_dir(job.id), ignore_errors=True)

    def _run_builtin(self, job: TrainingJob, running: _Running, base_path: Path, base_sha256: str, work: Path) -> None:
        """The built-in trainer's worker, to its end."""
        from locopilot.training.worker import Cancelled, Failed, TrainingWorker

        asked = {name: value for name, value in job.params.items() if name in Hyperparameters.__struct_fields__}
        if "chosen" in job.params:
            # Started before (a job resuming from its checkpoint): its params are the values it ran
            # with, the multiplier already applied to the learning rate.
            asked["learning_rate_multiplier"] = 1.0
        hyper = msgspec.convert({**asked, "seed": job.seed}, Hyperparameters)
        config = msgspec.structs.replace(
            self._config(hyper, job.base_model, base_path, work, work / "model.gguf"),
            dataset_path=job.dataset_path,
            checkpoint_dir=str(self.checkpoint_dir(job.id)),
        )
        log_path = self.work_root / f"{job.id}.log"
        last: object = None
        with log_path.open("ab") as worker_log, TrainingWorker(config, stderr=worker_log) as worker:
            with running.lock:
                running.worker = worker
            if running.cancel_requested or running.stopping:
                running.signal_stop()
            for event in worker.events():
                last = event
                self._record(job, event)
            code = worker.process.wait()
        if isinstance(last, Finished):
            self._publish(job, base_sha256, last)
        elif running.stopping:
            if not self._requeue(job.id):
                self._interrupted(job.id)
        elif isinstance(last, Cancelled) or running.cancel_requested:
            self._cancelled(job.id)
        elif isinstance(last, Failed):
            refused_dataset = last.refused and "dataset" in last.error
            code_name = "invalid_training_file" if refused_dataset else "training_failed"
            self._finish_sync(job.id, "failed", error=last.error, code=code_name)
        else:
            tail = log_tail(log_path)
            message = f"the training worker ended with status {code} before finishing" + (
                f": {tail[-1]}" if tail else ""
            )
            self._finish_sync(job.id, "failed", error=message, code="worker_died")

    def _run_framework(
        self, job: TrainingJob, running: _Running, base_path: Path, base_sha256: str, work: Path
    ) -> None:
        """The job's framework (see :mod:`locopilot.training.framework_jobs`), to its end: its
        output in the job's log file, its adapter converted and published beside the base."""
        from locopilot.training.adapters.base import STOP_GRACE_S, FrameworkFailed, start
        from locopilot.training.datasets import DatasetInvalid

        framework = job.framework
        log_path = self.work_root / f"{job.id}.log"
        try:
            plan, data = framework_jobs.plan(job, self.settings.training_python, work)
        except DatasetInvalid as exc:
            self._finish_sync(job.id, "failed", error=str(exc), code="invalid_training_file")
            return
        except FrameworkFailed as exc:
            self._finish_sync(job.id, "failed", error=str(exc), code="training_failed")
            return
        self._event(
            job.id,
            f"Training a LoRA adapter of {job.hf_base} with {framework} on {data.train_examples} examples "
            f"({data.valid_examples} held out); its output goes to {log_path}",
            data={
                "framework": framework,
                "examples": data.train_examples,
                "validation_examples": data.valid_examples,
                "steps": plan.steps,
                "command": plan.argv,
                "log_path": str(log_path),
            },
        )
        started = time.monotonic()
        reports = framework_jobs.Reports(plan, log_path)
        with log_path.open("ab") as framework_log:
            try:
                process = start(plan, work / "work", framework_log)
            except FrameworkFailed as exc:
                self._finish_sync(job.id, "failed", error=str(exc), code="training_failed")
                return
            with running.lock:
                running.worker = process
            if running.cancel_requested or running.stopping:
                running.signal_stop()
            while process.wait(FRAMEWORK_POLL_S) is None:
                for report in reports.read():
                    self._framework_progress(job, report, plan.steps, time.monotonic() - started)
            code = process.stop(STOP_GRACE_S)  # what it left running in its group, too
        for report in reports.read():
            self._framework_progress(job, report, plan.steps, time.monotonic() - started)
        seconds = time.monotonic() - started
        tail = log_tail(log_path, FRAMEWORK_LOG_TAIL)
        ended = {"framework": framework, "exit_status": code, "seconds": round(seconds, 1), "log_tail": tail}
        if running.stopping:
            self._interrupted(job.id)
        elif running.cancel_requested:
            self._cancelled(job.id)
        elif code != 0:
            self._event(
                job.id, f"{framework} exited with status {code} after {seconds:.0f} s", level="error", data=ended
            )
            error = f"{framework} exited with status {code}" + (f": {tail[-1]}" if tail else "")
            self._finish_sync(job.id, "failed", error=error, code="framework_failed")
        else:
            self._event(
                job.id,
                f"{framework} finished in {seconds:.0f} s; converting its adapter for {job.base_model}",
                data=ended,
            )
            target = work / "adapter.gguf"
            try:
                adapter = framework_jobs.convert(plan, base_path, job.base_model, target)
            except AdapterError as exc:
                self._finish_sync(job.id, "failed", error=exc.message, code="conversion_failed")
                return
            result = ended | {"lora_rank": adapter.rank, "adapted_tensors": len(adapter.pairs)}
            self._publish_model(job, base_sha256, target, result)

    def _framework_progress(
        self, job: TrainingJob, report: framework_jobs.Reported, steps: int, elapsed: float
    ) -> None:
        """A step the framework reported, as a ``metrics`` event like the built-in trainer's."""
        total = max(steps, report.step)
        data = {
            "step": report.step,
            "total_steps": total,
            "train_loss": report.loss,
            "tokens_per_s": report.tokens_per_s,
            "elapsed_s": elapsed,
            "eta_s": elapsed / report.step * (total - report.step) if report.step else None,
            "progress": report.step / total if total else 1.0,
        }
        store.update(self.db, job.id, progress=data["progress"])
        self._event(job.id, f"Step {report.step}/{total}: training loss={report.loss:.4f}", type="metrics", data=data)

    def _record(self, job: TrainingJob, event: object) -> None:
        match event:
            case Started():
                # The values the job runs with, ``auto`` ones resolved, replace the asked ones.
                job.params = {
                    **job.params,
                    "epochs": event.epochs,
                    "learning_rate": event.learning_rate,
                    "learning_rate_multiplier": event.learning_rate / event.auto_learning_rate,
                    "layers": event.layers,
                    **({} if event.lora_rank is None else {"lora_rank": event.lora_rank}),
                    "chosen": event.chosen,
                }
                store.update(self.db, job.id, params=job.params)
                self._event(
                    job.id,
                    f"Training {event.trained_layers} layers on {event.examples} examples "
                    f"({event.tokens} tokens, {event.steps} steps)",
                    data=msgspec.structs.asdict(event),
                )
            case Progress():
                remaining = (event.steps - event.step) * job.params.get("context", DEFAULT_CONTEXT)
                eta = remaining / event.tokens_per_s if event.tokens_per_s else None
                data = {
                    "step": event.step,
                    "total_steps": event.steps,
                    "epoch": event.epoch,
                    "train_loss": event.loss,
                    "tokens_per_s": event.tokens_per_s,
                    "elapsed_s": event.elapsed_s,
                    "eta_s": eta,
                    "progress": event.step / event.steps if event.steps else 1.0,
                }
                store.update(self.db, job.id, progress=data["progress"])
                self._event(
                    job.id,
                    f"Step {event.step}/{event.steps}: training loss={event.loss:.4f}",
                    type="metrics",
                    data=data,
                )
            case Checkpointed(resumed=True):
                self._event(job.id, f"Resumed from the checkpoint at step {event.step}/{event.steps}")
            case Checkpointed():
                self._event(
                    job.id,
                    f"Checkpoint saved at step {event.step}/{event.steps} ({event.seconds:.1f} s)",
                    data=msgspec.structs.asdict(event),
                )

    def _publish(self, job: TrainingJob, base_sha256: str, finished: Finished) -> None:
        """Move the trained model into the models folder with its lineage; the job succeeded.
        Unless the eval gate holds it back (:func:`gate`): then it is kept in the held folder
        and the job fails with ``held_back``, its result saying why."""
        source = Path(finished.output_path)
        sha256 = lineage.sha256_file(source)
        result = msgspec.structs.asdict(finished)
        result.pop("output_path")
        thresholds = {name: job.params[name] for name in GATE_THRESHOLDS if job.params.get(name) is not None}
        reasons = gate(thresholds, finished)
        result["gate"] = {"thresholds": thresholds, "passed": not reasons, "reasons": reasons}
        if reasons:
            held = self.work_root / "held" / f"{job.id}{source.suffix}"
            held.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            move_into(source, held)
            result["gate"]["held_path"] = str(held)
            message = "held back by the eval gate, not published as a model: " + "; ".join(reasons)
            self._finish_sync(
                job.id,
                "failed",
                error=message,
                code="held_back",
                output_path=str(held),
                output_sha256=sha256,
                trained_tokens=finished.trained_tokens,
                result=result,
                progress=1.0,
            )
            return
        self._publish_model(job, base_sha256, source, result, sha256, finished.trained_tokens)

    def _publish_model(
        self,
        job: TrainingJob,
        base_sha256: str,
        source: Path,
        result: dict[str, Any],
        sha256: str | None = None,
        trained_tokens: int | None = None,
    ) -> None:
        """Move ``source`` (a model, or a LoRA adapter of the job's base) into the models folder as
        ``<base>-ft-<id>`` with its lineage; the job succeeded with ``result``."""
        sha256 = sha256 or lineage.sha256_file(source)
        name = output_name(job.base_model, job.id)
        target = self.catalog.path_for(name)
        base_lineage = lineage.read(self.catalog.path_for(job.base_model))
        record = lineage.Lineage(
            sha256=sha256,
            job_id=job.id,
            framework=job.framework,
            base_model=job.base_model,
            base_sha256=base_sha256,
            dataset_sha256=job.dataset_sha256 or "",
            training_file=job.training_file,
            hyperparameters={**job.params, "seed": job.seed},
            hf_base=job.hf_base,
            created_at=self.clock(),
            base_lineage=None if base_lineage is None else msgspec.structs.asdict(base_lineage),
        )
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lineage.write(target, record)
        move_into(source, target)
        self._finish_sync(
            job.id,
            "succeeded",
            output_model=name,
            output_path=str(target),
            output_sha256=sha256,
            trained_tokens=trained_tokens,
            result=result,
            progress=1.0,
        )
        self._event(job.id, f"New fine-tuned model created: {name}", data=result)
        self._event(job.id, "The job has successfully completed")

    def _cancelled(self, job_id: str) -> None:
        self._finish_sync(job_id, "cancelled")
        self._event(job_id, "The job was cancelled")

    def _interrupted(self, job_id: str) -> None:
        self._finish_sync(
            job_id, "failed", error="interrupted: the server stopped while the job ran", code="interrupted"
        )

    def _finish_sync(
        self, job_id: str, status: str, *, error: str | None = None, code: str | None = None, **fields: Any
    ) -> None:
        finish(self.db, job_id, status, self.clock(), error=error, code=code, **fields)

    async def _finish(self, job_id: str, status: str, *, error: str | None = None, code: str | None = None) -> None:
        await self.db.call(finish, job_id, status, self.clock(), error=error, code=code)


def finish(
    db: Database,
    /,
    job_id: str,
    status: str,
    at: float,
    *,
    error: str | None = None,
    code: str | None = None,
    **fields: Any,
) -> None:
    """End a queued or running job with ``status`` at ``at`` (a failure's ``error`` also as an event)."""
    changed = store.transition(
        db, job_id, ("queued", "running"), status=status, error=error, error_code=code, finished_at=at, **fields
    )
    if changed and error is not None:
        store.add_event(db, job_id, at, f"The job failed: {error}", level="error")


def checkpoint_root(settings: Settings) -> Path:
    return settings.data_path / "training" / "checkpoints"


def checkpoint_step(folder: Path) -> int | None:
    """The step of the complete checkpoint in ``folder``, if there is one."""
    state = Checkpoints(str(folder), 1).state()
    return None if state is None else state.step


def resumable_jobs(settings: Settings) -> set[str]:
    """Ids of jobs with a complete checkpoint: at startup, running ones of these are queued
    again instead of failing (see the module docstring)."""
    root = checkpoint_root(settings)
    if not root.is_dir():
        return set()
    return {folder.name for folder in root.iterdir() if checkpoint_step(folder) is not None}


def log_tail(path: Path, lines: int = 1) -> list[str]:
    """The log's last ``lines`` non-empty lines (a llama.cpp abort message, a traceback's end), each
    cut to 500 characters, without terminal colors (MLX-LM's console writes them even to a file)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096 * lines))
            text = plain(f.read().decode(errors="replace"))
    except OSError:
        return []
    found = [line.strip() for line in text.splitlines() if line.strip()]
    return [line[:500] for line in found[-lines:]]
