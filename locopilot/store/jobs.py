"""Training jobs and their events: the ``training_jobs`` and ``training_events`` tables.

A job row is the whole record of one fine-tuning run: what it trained (the base model and
its sha256, the dataset file and its sha256, the hyperparameters), where the result went
(the output model, its path and sha256), how it ended (status, error, the trainer's result)
and when. Events are the job's log (``message``) and progress (``metrics``), in order.

Writes go through the database's writer thread and wait for it; reads block the calling
thread. From async code call these in a worker thread. ``now`` is unix seconds, passed in.
Raises :class:`~locopilot.store.db.StoreError` when the database fails, and
:class:`~locopilot.errors.NotFound` (code ``job_not_found``) for an unknown job.
"""

from __future__ import annotations

from typing import Any, Literal

import apsw
import msgspec

from locopilot.errors import NotFound
from locopilot.store.db import Database

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EventLevel = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]


class TrainingJob(msgspec.Struct, kw_only=True):
    """One row of ``training_jobs``. ``params`` are the trainer's hyperparameters; ``result``
    the trainer's own report of a finished run (losses, tokens/s, peak memory). ``framework``:
    ``llama.cpp`` (the built-in trainer) or the external framework that trains ``hf_base``, the
    base in Hugging Face form (:mod:`locopilot.training.framework_jobs`)."""

    id: str
    status: JobStatus
    framework: str = "llama.cpp"
    base_model: str
    hf_base: str | None = None
    base_sha256: str | None = None
    training_file: str | None = None
    dataset_path: str
    dataset_sha256: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    seed: int = 0
    output_model: str | None = None
    output_path: str | None = None
    output_sha256: str | None = None
    error: str | None = None
    error_code: str | None = None
    progress: float = 0.0
    trained_tokens: int | None = None
    result: dict[str, Any] | None = None
    key_id: str | None = None
    remote: str | None = None
    remote_job: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL


class JobEvent(msgspec.Struct, kw_only=True):
    """One row of ``training_events``."""

    id: int
    job_id: str
    created_at: float
    level: EventLevel
    type: EventType
    message: str
    data: dict[str, Any] | None = None


_JOB_COLUMNS = TrainingJob.__struct_fields__
_JSON = frozenset({"params", "result", "data"})
_SELECT_JOB = f"SELECT {', '.join(_JOB_COLUMNS)} FROM training_jobs"  # noqa: S608 (constant column names)
_EVENT_COLUMNS = JobEvent.__struct_fields__
_SELECT_EVENT = f"SELECT {', '.join(_EVENT_COLUMNS)} FROM training_events"  # noqa: S608


def _encode(name: str, value: Any) -> Any:
    return msgspec.json.encode(value).decode() if name in _JSON and value is not None else value


def _decode_row(names: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        name: msgspec.json.decode(value) if name in _JSON and value is not None else value
        for name, value in zip(names, row, strict=True)
    }


def insert(db: Database, job: TrainingJob) -> None:
    row = {name: _encode(name, getattr(job, name)) for name in _JOB_COLUMNS}
    db.insert("training_jobs", row, "a training job").result()


def update(db: Database, /, job_id: str, **fields: Any) -> None:
    """Set ``fields`` (column names of :class:`TrainingJob`) on one job."""
    unknown = set(fields) - set(_JOB_COLUMNS)
    if unknown:
        raise ValueError(f"not training job columns: {', '.join(sorted(unknown))}")
    assignments = ", ".join(f"{name} = :{name}" for name in fields)
    params = {name: _encode(name, value) for name, value in fields.items()} | {"job_id": job_id}
    db.write(f"UPDATE training_jobs SET {assignments} WHERE id = :job_id", params).result()  # noqa: S608


def transition(db: Database, /, job_id: str, from_status: tuple[str, ...], **fields: Any) -> bool:
    """:func:`update`, only while the job's status is one of ``from_status``; whether it changed.

    The status check and the write are one transaction, so a cancel and a finish racing each
    other cannot both win.
    """
    assignments = ", ".join(f"{name} = :{name}" for name in fields)
    statuses = ", ".join(f":s{i}" for i in range(len(from_status)))
    params = {name: _encode(name, value) for name, value in fields.items()}
    params |= {f"s{i}": status for i, status in enumerate(from_status)} | {"job_id": job_id}
    sql = f"UPDATE training_jobs SET {assignments} WHERE id = :job_id AND status IN ({statuses})"  # noqa: S608
    return db.write(sql, params).result() == 1


def get(db: Database, job_id: str) -> TrainingJob:
    """The job ``job_id``; raises NotFound."""

    def fetch(conn: apsw.Connection) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(f"{_SELECT_JOB} WHERE id = ?", (job_id,)).fetchone()
        return row

    row = db.read(fetch)
    if row is None:
        raise NotFound(f"No training job with id '{job_id[:100]}'", param="fine_tuning_job_id", code="job_not_found")
    return msgspec.convert(_decode_row(_JOB_COLUMNS, row), TrainingJob)


def listed(
    db: Database, *, after: str | None = None, limit: int = 20, status: str | None = None
) -> tuple[list[TrainingJob], bool]:
    """Jobs newest first, after the job ``after`` (a cursor), and whether more follow."""

    def fetch(conn: apsw.Connection) -> list[tuple[Any, ...]]:
        where, params = [], {"limit": limit + 1}
        if after is not None:
            where.append("(created_at, id) < (SELECT created_at, id FROM training_jobs WHERE id = :after)")
            params["after"] = after  # type: ignore[assignment]
        if status is not None:
            where.append("status = :status")
            params["status"] = status  # type: ignore[assignment]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"{_SELECT_JOB} {clause} ORDER BY created_at DESC, id DESC LIMIT :limit"
        return list(conn.execute(sql, params))

    rows = db.read(fetch)
    jobs = [msgspec.convert(_decode_row(_JOB_COLUMNS, row), TrainingJob) for row in rows[:limit]]
    return jobs, len(rows) > limit


def unfinished_job_using(db: Database, file_id: str) -> str | None:
    """The id of a queued or running job that trains on ``file_id``, if any."""
    row = db.read(
        lambda conn: conn.execute(
            "SELECT id FROM training_jobs WHERE training_file = ? AND status IN ('queued', 'running') LIMIT 1",
            (file_id,),
        ).fetchone()
    )
    return None if row is None else str(row[0])


def queued(db: Database) -> list[str]:
    """Ids of the jobs waiting to run, oldest first."""
    rows = db.read(
        lambda conn: list(
            conn.execute(
                "SELECT id FROM training_jobs WHERE status = 'queued' AND remote IS NULL ORDER BY created_at, id"
            )
        )
    )
    return [row[0] for row in rows]


def remote_unfinished(db: Database) -> list[TrainingJob]:
    """Jobs running on a remote whose end has not been seen here."""
    rows = db.read(
        lambda conn: list(
            conn.execute(
                f"{_SELECT_JOB} WHERE remote IS NOT NULL AND status IN ('queued', 'running') ORDER BY created_at"
            )
        )
    )
    return [msgspec.convert(_decode_row(_JOB_COLUMNS, row), TrainingJob) for row in rows]


def last_remote_event(db: Database, job_id: str) -> int:
    """The remote's id of the last event copied from a remote job (0: none)."""
    row = db.read(
        lambda conn: conn.execute(
            "SELECT max(json_extract(data, '$.remote_event_id')) FROM training_events WHERE job_id = ?", (job_id,)
        ).fetchone()
    )
    return int(row[0]) if row and row[0] is not None else 0


def add_event(
    db: Database,
    job_id: str,
    now: float,
    message: str,
    *,
    level: EventLevel = "info",
    type: EventType = "message",
    data: dict[str, Any] | None = None,
) -> int:
    """Append one event; its id."""
    row = {
        "job_id": job_id,
        "created_at": now,
        "level": level,
        "type": type,
        "message": message,
        "data": _encode("data", data),
    }
    return db.insert("training_events", row, "a training event").result()


def events(
    db: Database, job_id: str, *, after: int = 0, limit: int = 1000, newest_first: bool = False
) -> list[JobEvent]:
    """The job's events with an id past ``after`` (oldest first), or before it when ``newest_first``
    (``after`` 0: from the newest)."""

    def fetch(conn: apsw.Connection) -> list[tuple[Any, ...]]:
        if newest_first:
            sql = f"{_SELECT_EVENT} WHERE job_id = ? AND (? = 0 OR id < ?) ORDER BY id DESC LIMIT ?"
            return list(conn.execute(sql, (job_id, after, after, limit)))
        sql = f"{_SELECT_EVENT} WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?"
        return list(conn.execute(sql, (job_id, after, limit)))

    return [msgspec.convert(_decode_row(_EVENT_COLUMNS, row), JobEvent) for row in db.read(fetch)]
