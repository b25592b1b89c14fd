"""The request log: one ``inference_logs`` row per inference request, written off the request path.

:func:`record` only enqueues; the response never waits on the disk. Reads block the
calling thread (run them in a worker thread from async code).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Literal

import apsw
import msgspec

from locopilot.store.db import Database

LogStatus = Literal["ok", "error", "cancelled"]
LOG_STATUSES: tuple[LogStatus, ...] = ("ok", "error", "cancelled")


class InferenceLog(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``inference_logs``; field names and order are the table's columns."""

    id: int | None = None  # None until stored; the database assigns it
    request_id: str
    key_id: str | None = None
    endpoint: str
    model: str
    provider: str
    tokens_in: int
    tokens_out: int
    latency_ms: float
    ttfb_ms: float | None = None
    status: LogStatus
    http_status: int
    error: str | None = None
    created_at: float  # unix seconds
    routing: str | None = None  # JSON: the routing decision
    tokens_cached: int = 0  # of tokens_in, those the provider's prompt cache supplied
    prompt: str | None = None  # JSON: messages, prompt or inputs; only with LOCOPILOT_LOG_PROMPTS
    completion: str | None = None  # the reply's text; only with LOCOPILOT_LOG_PROMPTS


def _columns() -> str:
    return ", ".join(InferenceLog.__struct_fields__)


def record(db: Database, log: InferenceLog) -> Future[int]:
    """Queue ``log`` for insertion and return at once; the future holds the new row id.

    Callers may drop the future: a failed insert is also logged here, so a lost row is
    never silent. ``log.id`` is normally None; a given id is inserted as is.

    Raises:
        StoreError: the database is closed or its writer has stopped (nothing is queued).
    """
    params = msgspec.structs.asdict(log)
    return db.insert("inference_logs", params, "an inference log row")


def record_many(db: Database, rows: list[InferenceLog]) -> Future[int]:
    """:func:`record` for several rows, in one transaction; the future holds how many were
    stored (a row the database refuses is dropped and logged alone). ``rows`` must not be empty.

    Raises:
        StoreError: the database is closed or its writer has stopped (nothing is queued).
    """
    return db.insert_many("inference_logs", [msgspec.structs.asdict(row) for row in rows], "an inference log row")


def recent(db: Database, *, limit: int = 100, request_id: str | None = None) -> list[InferenceLog]:
    """The newest ``limit`` rows (by ``created_at``, then id), optionally only ``request_id``'s.

    Raises:
        ValueError: ``limit`` is negative.
        StoreError: the read failed.
    """
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, not {limit}")
    where = "WHERE request_id = :request_id" if request_id is not None else ""
    sql = f"SELECT {_columns()} FROM inference_logs {where} ORDER BY created_at DESC, id DESC LIMIT :limit"  # noqa: S608
    names = InferenceLog.__struct_fields__

    def fetch(conn: apsw.Connection) -> list[InferenceLog]:
        rows = conn.execute(sql, {"request_id": request_id, "limit": limit})
        # convert() checks each row against the struct, so a bad row fails loudly here.
        return [msgspec.convert(dict(zip(names, row, strict=True)), InferenceLog) for row in rows]

    return db.read(fetch)


def with_text(
    db: Database,
    *,
    limit: int,
    model: str | None = None,
    provider: str | None = None,
    key_id: str | None = None,
    status: LogStatus | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[InferenceLog]:
    """The oldest ``limit`` rows that hold their prompt (``LOCOPILOT_LOG_PROMPTS``), by
    ``created_at`` then id, narrowed by each filter given (``since`` inclusive, ``until`` not).

    Raises:
        StoreError: the read failed.
    """
    filters = {
        "model": model,
        "provider": provider,
        "key_id": key_id,
        "status": status,
    }
    where = ["prompt IS NOT NULL", *(f"{column} = :{column}" for column, value in filters.items() if value is not None)]
    if since is not None:
        where.append("created_at >= :since")
    if until is not None:
        where.append("created_at < :until")
    sql = (
        f"SELECT {_columns()} FROM inference_logs WHERE {' AND '.join(where)} "  # noqa: S608
        "ORDER BY created_at, id LIMIT :limit"
    )
    names = InferenceLog.__struct_fields__
    params = {**filters, "since": since, "until": until, "limit": limit}

    def fetch(conn: apsw.Connection) -> list[InferenceLog]:
        return [msgspec.convert(dict(zip(names, row, strict=True)), InferenceLog) for row in conn.execute(sql, params)]

    return db.read(fetch)
