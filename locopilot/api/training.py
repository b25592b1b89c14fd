"""Training jobs (scope ``training``), in two shapes over the same rows.

- locopilot's own, ``/v1/locopilot/training/jobs``: every hyperparameter by its name, the
  lineage, the trainer's result, and ``…/{id}/logs``, an SSE stream of the job's events
  (progress, loss, tokens/s, ETA) that ends when the job does.
- OpenAI's, ``/v1/fine_tuning/jobs``: what ``client.fine_tuning.jobs`` sends and reads.
  ``hyperparameters`` (or ``method.supervised.hyperparameters``) takes OpenAI's ``n_epochs``,
  ``learning_rate_multiplier`` (times the learning rate the ``auto`` rule picks for the model)
  and ``batch_size`` (``auto`` or 1: each optimizer step is one window of ``context`` tokens),
  each ``auto`` by default (:mod:`locopilot.training.auto`), and locopilot's own names for the
  rest (:mod:`locopilot.training.hyperparameters`, the one schema both shapes share). The job object
  reports ``auto`` until the job starts, then the values chosen (``learning_rate`` and
  ``layers`` beside OpenAI's three).

Both take ``framework`` and ``hf_base`` (locopilot's; ``extra_body`` in the SDK): an external
framework trains a LoRA adapter of the base's Hugging Face folder on the server, published
beside the GGUF ``model`` (:mod:`locopilot.training.framework_jobs`); its job reports the values
the framework runs with from the start.

The queue itself is :mod:`locopilot.training.jobs`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from msgspec import Meta

from locopilot.api.responses import BODY, GUARDED, answers, json_response
from locopilot.errors import Forbidden, InvalidModelName, InvalidRequest, ModelNotFound
from locopilot.gateway.auth import principal_of
from locopilot.gateway.shutdown import Shutdown
from locopilot.schemas.openai import encoder
from locopilot.schemas.training import JobErrorInfo, JobInfo, JobList, LogEvent
from locopilot.store import jobs as store
from locopilot.store.db import Database
from locopilot.store.jobs import JobEvent, JobStatus, TrainingJob
from locopilot.training.hyperparameters import (
    Anchors,
    Auto,
    CheckpointSteps,
    Context,
    Epochs,
    FileId,
    Framework,
    HyperparameterInvalid,
    Layers,
    LearningRate,
    LoraRank,
    Loss,
    MaxSpotCheckLost,
    MaxValidationLoss,
    MinRecall,
    ModelName,
    Multiplier,
    Optimizer,
    Output,
    RemoteName,
    Seed,
    ValidationSplit,
    WeightDecay,
)
from locopilot.training.jobs import HFFolder, JobService, JobSpec

#: OpenAI ``metadata`` keys read as the eval gate's thresholds (its values are strings), and their types.
GATE_METADATA: dict[str, Any] = {
    "min_recall": MinRecall,
    "max_validation_loss": MaxValidationLoss,
    "max_spot_check_lost": MaxSpotCheckLost,
}

#: How often a log stream looks for new events.
FOLLOW_INTERVAL_S = 0.5
#: A log stream sends a comment this often while nothing happens, so proxies keep it open.
KEEPALIVE_S = 15.0


# -- locopilot's shape -----------------------------------------------------------------


def error_of(job: TrainingJob) -> JobErrorInfo | None:
    if job.error is None:
        return None
    param = "training_file" if job.error_code == "invalid_training_file" else None
    return JobErrorInfo(job.error_code or "failed", job.error, param)


def job_info(job: TrainingJob) -> JobInfo:
    return JobInfo(
        id=job.id,
        status=job.status,
        framework=job.framework,
        model=job.base_model,
        base_sha256=job.base_sha256,
        training_file=job.training_file,
        dataset_sha256=job.dataset_sha256,
        hyperparameters=job.params,
        seed=job.seed,
        fine_tuned_model=job.output_model,
        output_sha256=job.output_sha256,
        progress=job.progress,
        trained_tokens=job.trained_tokens,
        result=job.result,
        error=error_of(job),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        remote=job.remote,
        remote_job=job.remote_job,
        hf_base=job.hf_base,
    )


async def find(db: Database, job_id: str) -> TrainingJob:
    return await db.call(store.get, job_id)


async def placed(training: JobService, spec: JobSpec) -> JobSpec:
    """Where a job that names no ``remote`` runs: here when the base model is in this models folder; else on
    the ``local`` upstream locopilot (kind ``openai``) that has it and the fewest training jobs queued or
    running (the first listed on a tie); here, and refused as before, when none has it."""
    if spec.remote is not None:
        return spec
    try:
        await anyio.to_thread.run_sync(training.catalog.get, spec.model)
        return spec
    except InvalidModelName:
        return spec  # refused with its reason by submit
    except ModelNotFound:
        pass
    # Only `local` boxes: a dataset is never sent to a remote upstream that the request did not name.
    boxes = [u for u in training.settings.upstream_configs if u.kind == "openai" and u.locality == "local"]
    loads: list[int | None] = [None] * len(boxes)

    async def ask(i: int) -> None:
        loads[i] = await training.remotes.load(boxes[i], spec.model)

    async with anyio.create_task_group() as tasks:
        for i in range(len(boxes)):
            tasks.start_soon(ask, i)
    ranked = sorted((busy, i) for i, busy in enumerate(loads) if busy is not None)
    return msgspec.structs.replace(spec, remote=boxes[ranked[0][1]].name) if ranked else spec


@post("/v1/locopilot/training/jobs", status_code=200, responses=answers(JobInfo, 200, *GUARDED, *BODY, 404))
async def create_job(data: JobSpec, training: JobService, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Queue a fine-tuning job of a model in the models folder on an uploaded dataset (with no ``remote`` and a
    base model this server lacks: on the least-busy upstream locopilot that has it)."""
    checked(data)
    job = await submitted(training, await placed(training, data), request)
    return json_response(job_info(job))


@get("/v1/locopilot/training/jobs", responses=answers(JobList, 200, *GUARDED, 400))
async def list_jobs(
    db: Database,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Parameter(max_length=128)] = None,
    status: JobStatus | None = None,
) -> Response[bytes]:
    """Jobs, newest first."""
    found, more = await db.call(store.listed, after=after, limit=limit, status=status)
    return json_response(JobList([job_info(job) for job in found], more))


@get("/v1/locopilot/training/jobs/{job_id:str}", responses=answers(JobInfo, 200, *GUARDED, 400, 404))
async def get_job(job_id: str, db: Database) -> Response[bytes]:
    """One job."""
    return json_response(job_info(await find(db, job_id)))


@post(
    "/v1/locopilot/training/jobs/{job_id:str}/cancel",
    status_code=200,
    responses=answers(JobInfo, 200, *GUARDED, 400, 404),
)
async def cancel_job(job_id: str, training: JobService) -> Response[bytes]:
    """Cancel a queued or running job (a running one's worker is stopped at once; nothing is written)."""
    return json_response(job_info(await training.cancel(job_id)))


EVENT_STREAM = ResponseSpec(
    str,
    media_type="text/event-stream",
    generate_examples=False,
    description="SSE: `message` and `metrics` events (step, train_loss, tokens_per_s, eta_s), then `end` with the job",
)


async def follow(db: Database, shutdown: Shutdown, job_id: str, after: int) -> AsyncIterator[ServerSentEventMessage]:
    """The job's events from ``after`` on, then ``end`` with the job once it is over; a
    ``keep-alive`` comment after KEEPALIVE_S without one.

    Ends early (``event: error``) when the server begins to stop, so it never holds the drain.
    """
    quiet = 0.0
    final_seen = False
    while True:
        job = await find(db, job_id)
        found: list[JobEvent] = await db.call(store.events, job_id, after=after)
        for event in found:
            after = event.id
            log_event = LogEvent(event.id, event.created_at, event.level, event.message, event.data)
            yield ServerSentEventMessage(encoder.encode(log_event), event=event.type)
        if job.final:
            # The job's last events are written just after its status: one more look for them.
            if final_seen and not found:
                yield ServerSentEventMessage(encoder.encode(job_info(job)), event="end")
                return
            final_seen = True
        if shutdown.draining:
            error = JobErrorInfo("shutting_down", "The server is shutting down; follow the job again later.")
            yield ServerSentEventMessage(encoder.encode(error), event="error")
            return
        await anyio.sleep(FOLLOW_INTERVAL_S)
        quiet = 0.0 if found else quiet + FOLLOW_INTERVAL_S
        if quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ServerSentEventMessage(data=None, comment="keep-alive")


@get(
    "/v1/locopilot/training/jobs/{job_id:str}/logs",
    responses={**answers(str, 200, *GUARDED, 400, 404), 200: EVENT_STREAM},
)
async def job_logs(
    job_id: str, db: Database, shutdown: Shutdown, after: Annotated[int, Parameter(ge=0, le=2**62)] = 0
) -> ServerSentEvent:
    """Follow a job: its events so far (after event ``after``), then new ones as they come, until it ends."""
    await find(db, job_id)  # a 404 before the stream starts
    return ServerSentEvent(follow(db, shutdown, job_id, after))


# -- OpenAI's shape --------------------------------------------------------------------


class Hyperparameters(msgspec.Struct, kw_only=True):
    """OpenAI's names for three, locopilot's (:class:`~locopilot.training.hyperparameters.Hyperparameters`)
    for the rest, over the same types; None: not given."""

    n_epochs: Epochs | Auto | None = None
    batch_size: Annotated[int, Meta(ge=1)] | Auto | None = None
    learning_rate_multiplier: Multiplier | Auto | None = None
    learning_rate: LearningRate | Auto | None = None
    optimizer: Optimizer | None = None
    weight_decay: WeightDecay | None = None
    layers: Layers | Auto | None = None
    context: Context | None = None
    validation_split: ValidationSplit | None = None
    output_type: Output | None = None
    lora_rank: LoraRank | Auto | None = None
    loss: Loss | None = None
    anchors: Anchors | None = None
    checkpoint_steps: CheckpointSteps | None = None
    min_recall: MinRecall | None = None
    max_validation_loss: MaxValidationLoss | None = None
    max_spot_check_lost: MaxSpotCheckLost | None = None


#: OpenAI's names for locopilot's.
OPENAI_NAMES = {"n_epochs": "epochs"}


class Supervised(msgspec.Struct, kw_only=True):
    hyperparameters: Hyperparameters | None = None


class Method(msgspec.Struct, kw_only=True):
    type: str
    supervised: Supervised | None = None


class FineTuningJobRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/fine_tuning/jobs``, as OpenAI's; unknown fields are ignored."""

    model: ModelName
    training_file: FileId
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    seed: Seed | None = None
    suffix: str | None = None
    validation_file: str | None = None
    remote: RemoteName | None = None
    """locopilot's: run the job on this upstream (another locopilot); ``extra_body`` in the SDK."""
    framework: Framework = "builtin"
    """locopilot's: an external framework trains a LoRA adapter of ``hf_base`` (``extra_body``)."""
    hf_base: HFFolder | None = None
    """locopilot's: with ``framework``, the base in Hugging Face form, a folder on the server."""
    metadata: dict[str, str] | None = None
    """OpenAI's; the keys of GATE_METADATA set the eval gate's thresholds."""


class FineTuningHyperparameters(msgspec.Struct, omit_defaults=True):
    """OpenAI's three (``auto`` until the job starts, then the values chosen), and locopilot's
    ``learning_rate`` and ``layers`` (the last N blocks trained; 0: all), and ``lora_rank`` for a
    job that publishes a LoRA adapter."""

    n_epochs: int | Auto
    batch_size: int | Auto
    learning_rate_multiplier: float | Auto
    learning_rate: float | Auto
    layers: int | Auto
    lora_rank: int | Auto | None = None


class FineTuningMethod(msgspec.Struct):
    supervised: dict[str, FineTuningHyperparameters]
    type: str = "supervised"


class FineTuningJob(msgspec.Struct, kw_only=True):
    """OpenAI's ``fine_tuning.job``."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str = "locopilot"
    status: JobStatus
    hyperparameters: FineTuningHyperparameters
    method: FineTuningMethod
    training_file: str
    validation_file: str | None = None
    result_files: list[str] = msgspec.field(default_factory=list)
    trained_tokens: int | None
    error: JobErrorInfo | None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None


class FineTuningJobList(msgspec.Struct):
    data: list[FineTuningJob]
    has_more: bool
    object: Literal["list"] = "list"


class FineTuningEvent(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class FineTuningEventList(msgspec.Struct):
    data: list[FineTuningEvent]
    has_more: bool
    object: Literal["list"] = "list"


def openai_job(job: TrainingJob) -> FineTuningJob:
    params = job.params
    rate = params.get("learning_rate", "auto")
    multiplier = params.get("learning_rate_multiplier", 1.0)
    hyper = FineTuningHyperparameters(
        n_epochs=params.get("epochs", "auto"),
        batch_size=1,
        # Before the job starts, a multiplier of an auto rate is still auto unless one was given.
        learning_rate_multiplier="auto" if rate == "auto" and multiplier == 1.0 else multiplier,
        learning_rate=rate,
        layers=params.get("layers", "auto"),
        lora_rank=params.get("lora_rank"),
    )
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at),
        finished_at=None if job.finished_at is None else int(job.finished_at),
        model=job.base_model,
        fine_tuned_model=job.output_model,
        status=job.status,
        hyperparameters=hyper,
        method=FineTuningMethod({"hyperparameters": hyper}),
        training_file=job.training_file or "",
        trained_tokens=job.trained_tokens,
        error=error_of(job),
        seed=job.seed,
    )


def spec_of(body: FineTuningJobRequest) -> JobSpec:
    """The job an OpenAI request asks for; raises InvalidRequest for what locopilot cannot do."""
    if body.validation_file:
        raise InvalidRequest(
            "validation_file is not supported; a part of training_file is held out.", param="validation_file"
        )
    if body.suffix:
        raise InvalidRequest("suffix is not supported; the model is named <base>-ft-<job>.", param="suffix")
    hyper = body.hyperparameters
    if body.method is not None:
        if body.method.type != "supervised":
            raise InvalidRequest(f"Only the supervised method is supported, not {body.method.type!r}.", param="method")
        if body.method.supervised is not None and body.method.supervised.hyperparameters is not None:
            hyper = body.method.supervised.hyperparameters
    hyper = hyper or Hyperparameters()
    if hyper.batch_size not in (None, "auto", 1):
        raise InvalidRequest(
            "batch_size must be 1 or auto: each step trains on one window of `context` tokens.",
            param="hyperparameters.batch_size",
        )
    values: dict[str, Any] = {
        "model": body.model,
        "training_file": body.training_file,
        "seed": body.seed or 0,
        "remote": body.remote,
        "framework": body.framework,
        "hf_base": body.hf_base,
    }
    for name in Hyperparameters.__struct_fields__:
        value = getattr(hyper, name)
        # A multiplier of "auto" is 1 (times the auto rule's rate); batch_size is checked above.
        if value is not None and name != "batch_size" and (name, value) != ("learning_rate_multiplier", "auto"):
            values[OPENAI_NAMES.get(name, name)] = value
    # The eval gate's thresholds may come as OpenAI metadata too; hyperparameters win.
    values = gate_metadata(body.metadata or {}) | values
    spec = msgspec.convert(values, JobSpec)  # the same types: nothing new to refuse
    checked(spec, "hyperparameters.")
    return spec


def checked(spec: JobSpec, prefix: str = "") -> None:
    """Raises InvalidRequest (param: the field, after ``prefix``) for the rule across fields
    that the body's types cannot state."""
    try:
        spec.check()
    except HyperparameterInvalid as exc:
        raise InvalidRequest(str(exc), param=None if exc.field is None else prefix + exc.field) from exc


def gate_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The eval-gate thresholds among OpenAI ``metadata`` (strings, as OpenAI has them); raises
    InvalidRequest naming the key whose value is not a number in range."""
    values: dict[str, Any] = {}
    for name, kind in GATE_METADATA.items():
        if name not in metadata:
            continue
        try:
            values[name] = msgspec.convert(msgspec.json.decode(metadata[name]), kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidRequest(f"metadata.{name} must be a number in range: {exc}", param=f"metadata.{name}") from exc
    return values


@post("/v1/fine_tuning/jobs", status_code=200, responses=answers(FineTuningJob, 200, *GUARDED, *BODY, 404))
async def create_fine_tuning_job(
    data: FineTuningJobRequest, training: JobService, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """OpenAI's create: a job of a model in the models folder on an uploaded file (or, as for the native create,
    on the least-busy upstream locopilot that has it)."""
    job = await submitted(training, await placed(training, spec_of(data)), request)
    return json_response(openai_job(job))


async def submitted(training: JobService, spec: JobSpec, request: Request[Any, Any, Any]) -> TrainingJob:
    """``spec`` queued for the request's principal. A job that names a framework needs the admin
    scope (Forbidden otherwise): it has the server read ``hf_base``, a folder anywhere on it, and
    run the framework's Python, both chosen by whoever configures the server."""
    principal = principal_of(request)
    if spec.framework != "builtin" and "admin" not in principal.scopes:
        raise Forbidden(
            "a job that names a framework trains hf_base, a folder on the server: it needs a key with the admin scope",
            param="framework",
        )
    return await training.submit(spec, principal.key_id)


@get("/v1/fine_tuning/jobs", responses=answers(FineTuningJobList, 200, *GUARDED, 400))
async def list_fine_tuning_jobs(
    db: Database,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Parameter(max_length=128)] = None,
) -> Response[bytes]:
    """OpenAI's list: newest first, ``after`` a job id."""
    found, more = await db.call(store.listed, after=after, limit=limit)
    return json_response(FineTuningJobList([openai_job(job) for job in found], more))


@get("/v1/fine_tuning/jobs/{fine_tuning_job_id:str}", responses=answers(FineTuningJob, 200, *GUARDED, 400, 404))
async def get_fine_tuning_job(fine_tuning_job_id: str, db: Database) -> Response[bytes]:
    return json_response(openai_job(await find(db, fine_tuning_job_id)))


@post(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/cancel",
    status_code=200,
    responses=answers(FineTuningJob, 200, *GUARDED, 400, 404),
)
async def cancel_fine_tuning_job(fine_tuning_job_id: str, training: JobService) -> Response[bytes]:
    return json_response(openai_job(await training.cancel(fine_tuning_job_id)))


EVENT_ID_PREFIX = "ftevent-"


@get(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/events",
    responses=answers(FineTuningEventList, 200, *GUARDED, 400, 404),
)
async def fine_tuning_events(
    fine_tuning_job_id: str,
    db: Database,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Parameter(max_length=128)] = None,
) -> Response[bytes]:
    """OpenAI's events: newest first; ``after`` an event id, for the page of older ones."""
    await find(db, fine_tuning_job_id)
    cursor = 0
    if after is not None:
        try:
            cursor = int(after.removeprefix(EVENT_ID_PREFIX))
        except ValueError:
            raise InvalidRequest(f"after must be an event id ({EVENT_ID_PREFIX}N)", param="after") from None
    found = await db.call(store.events, fine_tuning_job_id, after=cursor, limit=limit + 1, newest_first=True)
    data = [
        FineTuningEvent(
            id=f"{EVENT_ID_PREFIX}{event.id}",
            created_at=int(event.created_at),
            level=event.level,
            message=event.message,
            type=event.type,
            data=event.data,
        )
        for event in found[:limit]
    ]
    return json_response(FineTuningEventList(data, len(found) > limit))


ROUTES = [
    create_job,
    list_jobs,
    get_job,
    cancel_job,
    job_logs,
    create_fine_tuning_job,
    list_fine_tuning_jobs,
    get_fine_tuning_job,
    cancel_fine_tuning_job,
    fine_tuning_events,
]
