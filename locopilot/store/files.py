"""Uploaded files: the ``files`` table. The bytes live under the data folder, named by the server.

Writes wait for the writer thread and reads block the calling thread; from async code
call these in a worker thread. Raises :class:`~locopilot.store.db.StoreError` when the
database fails and :class:`~locopilot.errors.NotFound` (code ``file_not_found``) for an
unknown file.
"""

from __future__ import annotations

from typing import Any

import apsw
import msgspec

from locopilot.errors import NotFound
from locopilot.store.db import Database


class StoredFile(msgspec.Struct, frozen=True, kw_only=True):
    """One uploaded file. ``filename`` is the client's name, for display only; ``path`` is ours."""

    id: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    path: str
    format: str | None = None
    examples: int | None = None
    key_id: str | None = None
    created_at: float


_COLUMNS = StoredFile.__struct_fields__
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM files"  # noqa: S608 (constant column names)


def insert(db: Database, stored: StoredFile) -> None:
    db.insert("files", msgspec.structs.asdict(stored), "an uploaded file").result()


def get(db: Database, file_id: str) -> StoredFile:
    """The file ``file_id``; raises NotFound."""

    def fetch(conn: apsw.Connection) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(f"{_SELECT} WHERE id = ?", (file_id,)).fetchone()
        return row

    row = db.read(fetch)
    if row is None:
        raise NotFound(f"No such file: '{file_id[:100]}'", param="file_id", code="file_not_found")
    return StoredFile(**dict(zip(_COLUMNS, row, strict=True)))


def listed(
    db: Database, *, after: str | None = None, limit: int = 100, purpose: str | None = None, newest_first: bool = True
) -> tuple[list[StoredFile], bool]:
    """Files in creation order (newest first unless told otherwise), after ``after``; and whether more follow."""

    def fetch(conn: apsw.Connection) -> list[tuple[Any, ...]]:
        where, params = [], {"limit": limit + 1}
        op = "<" if newest_first else ">"
        if after is not None:
            where.append(f"(created_at, id) {op} (SELECT created_at, id FROM files WHERE id = :after)")  # noqa: S608
            params["after"] = after  # type: ignore[assignment]
        if purpose is not None:
            where.append("purpose = :purpose")
            params["purpose"] = purpose  # type: ignore[assignment]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "DESC" if newest_first else "ASC"
        return list(conn.execute(f"{_SELECT} {clause} ORDER BY created_at {order}, id {order} LIMIT :limit", params))

    rows = db.read(fetch)
    found = [StoredFile(**dict(zip(_COLUMNS, row, strict=True))) for row in rows[:limit]]
    return found, len(rows) > limit


def delete(db: Database, file_id: str) -> bool:
    """Remove the row; whether there was one. The caller removes the bytes."""
    return db.write("DELETE FROM files WHERE id = ?", (file_id,)).result() == 1
