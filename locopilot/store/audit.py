"""The audit trail: the ``audit_events`` table, one row per authentication failure or admin action.

A row never holds a secret: not a presented key (right or wrong), not a header, not
a query string. :func:`record` only enqueues, so a refused request never waits on
the disk. :func:`recent` blocks the calling thread.

Events:

    auth_failed   401: no key, an unknown, malformed, revoked or expired key
    forbidden     403: a key without the route's scope, or a model outside its allowlist
    key_created   a key was made (over HTTP or with ``locopilot keys create``)
    key_revoked   a key was revoked
    admin_action  any other change made with the admin scope
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import apsw
import msgspec

from locopilot.store.db import Database

#: Paths are the client's to choose; a row keeps this much of one.
MAX_PATH = 512


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``audit_events``; ``detail`` is stored as JSON."""

    id: int | None = None  # None until stored
    created_at: float  # unix seconds
    event: str
    key_id: str | None = None
    client: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    detail: dict[str, Any] | None = None


_COLUMNS = ", ".join(AuditEvent.__struct_fields__)


def record(db: Database, event: AuditEvent) -> Future[int]:
    """Queue ``event`` and return at once; the future holds the new row id. A failed insert is logged.

    Raises:
        StoreError: the database is closed or its writer has stopped (nothing is queued).
    """
    params = msgspec.structs.asdict(event)
    params["path"] = None if event.path is None else event.path[:MAX_PATH]
    params["detail"] = None if event.detail is None else msgspec.json.encode(event.detail).decode()
    return db.insert("audit_events", params, "an audit event")


def recent(db: Database, *, limit: int = 100, event: str | None = None) -> list[AuditEvent]:
    """The newest ``limit`` events, newest first, optionally only those named ``event``.

    Raises:
        ValueError: ``limit`` is negative.
        StoreError: the read failed.
    """
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, not {limit}")
    where = "WHERE event = :event" if event is not None else ""
    sql = f"SELECT {_COLUMNS} FROM audit_events {where} ORDER BY id DESC LIMIT :limit"  # noqa: S608
    names = AuditEvent.__struct_fields__

    def fetch(conn: apsw.Connection) -> list[AuditEvent]:
        rows = []
        for row in conn.execute(sql, {"event": event, "limit": limit}):
            values = dict(zip(names, row, strict=True))
            if values["detail"] is not None:
                values["detail"] = msgspec.json.decode(values["detail"])
            rows.append(msgspec.convert(values, AuditEvent))
        return rows

    return db.read(fetch)
