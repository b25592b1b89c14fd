"""Model records: the ``model_records`` table. Where each model came from, its SHA-256, size and arrival.

A record is written when a model arrives (pull, ``models add``, import) and removed
with the model. A model in the folder without a record arrived some other way (copied
in by hand); it is listed all the same, without these facts.

Writes wait for the writer thread and reads block the calling thread; from async code
call these in a worker thread. Raises :class:`~locopilot.store.db.StoreError` when the
database fails.
"""

from __future__ import annotations

from typing import Any

import apsw
import msgspec

from locopilot.store.db import Database


class FilePart(msgspec.Struct, frozen=True):
    name: str
    sha256: str | None
    size: int


class ModelRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    source: str
    sha256: str | None
    size: int
    files: list[FilePart] = []
    metadata: dict[str, str] = {}
    pinned: bool = False
    arrived_at: float


_COLUMNS = ModelRecord.__struct_fields__
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM model_records"  # noqa: S608 (constant column names)
_files = msgspec.json.Decoder(list[FilePart])
_metadata = msgspec.json.Decoder(dict[str, str])


def _row(row: tuple[Any, ...]) -> ModelRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["files"] = _files.decode(values["files"])
    values["metadata"] = _metadata.decode(values["metadata"])
    values["pinned"] = bool(values["pinned"])
    return ModelRecord(**values)


def put(db: Database, record: ModelRecord) -> None:
    """Insert or replace the record of ``record.name``."""
    values = msgspec.structs.asdict(record)
    values["files"] = msgspec.json.encode(record.files).decode()
    values["metadata"] = msgspec.json.encode(record.metadata).decode()
    values["pinned"] = int(record.pinned)
    columns = ", ".join(_COLUMNS)
    marks = ", ".join(f":{c}" for c in _COLUMNS)
    db.write(f"INSERT OR REPLACE INTO model_records ({columns}) VALUES ({marks})", values).result()  # noqa: S608


def get(db: Database, name: str) -> ModelRecord | None:
    def fetch(conn: apsw.Connection) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
        return row

    row = db.read(fetch)
    return None if row is None else _row(row)


def every(db: Database) -> dict[str, ModelRecord]:
    rows = db.read(lambda conn: list(conn.execute(f"{_SELECT} ORDER BY name")))
    return {record.name: record for record in map(_row, rows)}


def delete(db: Database, name: str) -> bool:
    return db.write("DELETE FROM model_records WHERE name = ?", (name,)).result() == 1


def training_job_using(db: Database, name: str) -> str | None:
    """The id of a queued or running job (on this server) that trains model ``name``, if any."""
    row = db.read(
        lambda conn: conn.execute(
            "SELECT id FROM training_jobs WHERE base_model = ? AND status IN ('queued', 'running') "
            "AND remote IS NULL LIMIT 1",
            (name,),
        ).fetchone()
    )
    return None if row is None else str(row[0])
