"""The SQLite state layer, on real files: permissions, WAL, migrations, the single writer, the request log."""

from __future__ import annotations

import os
import stat
import threading
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import apsw
import msgspec
import pytest

from locopilot.store import logs
from locopilot.store.db import Database, StoreConstraintError, StoreError
from locopilot.store.logs import InferenceLog
from locopilot.store.migrations import MIGRATIONS


def count_by_status(db: Database) -> dict[str, int]:
    """Log rows per status, every status of LOG_STATUSES present."""

    def fetch(conn: apsw.Connection) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(logs.LOG_STATUSES, 0)
        for status, count in conn.execute("SELECT status, count(*) FROM inference_logs GROUP BY status"):
            counts[status] = count
        return counts

    return db.read(fetch)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "locopilot.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = Database.open(db_path)
    yield database
    database.close()


def make_log(n: int = 0, **changes: typing.Any) -> InferenceLog:
    log = InferenceLog(
        request_id=f"req-{n}",
        endpoint="/v1/chat/completions",
        model="gemma3:270m",
        provider="local",
        tokens_in=10 + n,
        tokens_out=20 + n,
        latency_ms=123.5,
        status="ok",
        http_status=200,
        created_at=1_700_000_000.0 + n,
    )
    return msgspec.structs.replace(log, **changes)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_open_makes_private_folder_and_files_whatever_the_umask(db_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: nothing may rely on it
    try:
        database = Database.open(db_path)
    finally:
        os.umask(old)
    try:
        database.write(
            "INSERT INTO training_jobs (id, status, base_model, dataset_path, created_at) "
            "VALUES ('j', 'queued', 'm', 'd', 0)"
        ).result()
        assert mode(db_path.parent) == 0o700
        assert mode(db_path) == 0o600
        wal = db_path.with_name(db_path.name + "-wal")
        shm = db_path.with_name(db_path.name + "-shm")
        assert wal.exists()  # WAL mode keeps it while a connection is open
        assert mode(wal) == 0o600
        assert mode(shm) == 0o600
    finally:
        database.close()


def test_open_tightens_an_existing_folder_and_file(db_path: Path) -> None:
    db_path.parent.mkdir(mode=0o755)
    db_path.parent.chmod(0o755)
    db_path.touch()
    db_path.chmod(0o644)
    Database.open(db_path).close()
    assert mode(db_path.parent) == 0o700
    assert mode(db_path) == 0o600


def test_pragmas(db: Database) -> None:
    assert db.read(lambda conn: conn.pragma("journal_mode")) == "wal"
    writer_settings = db.submit(
        lambda conn: (conn.pragma("synchronous"), conn.pragma("foreign_keys"), conn.pragma("busy_timeout"))
    ).result()
    assert writer_settings == (1, 1, 5000)  # synchronous=1 is NORMAL


def test_migrations_are_applied_once_and_reopen_is_idempotent(db_path: Path) -> None:
    Database.open(db_path).close()
    Database.open(db_path).close()  # CREATE TABLE would fail if migration 1 ran twice
    database = Database.open(db_path)
    try:
        assert database.read(lambda conn: conn.pragma("user_version")) == len(MIGRATIONS)
        tables = database.read(
            lambda conn: {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        )
        assert {"inference_logs", "training_jobs"} <= tables
    finally:
        database.close()


def test_a_newer_database_is_refused(db_path: Path) -> None:
    Database.open(db_path).close()
    conn = apsw.Connection(str(db_path))
    conn.pragma("user_version", len(MIGRATIONS) + 1)
    conn.close()
    with pytest.raises(StoreError, match="upgrade locopilot"):
        Database.open(db_path)


def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not an SQLite file, not even close" * 100)
    with pytest.raises(StoreError) as info:
        Database.open(db_path)
    assert isinstance(info.value.__cause__, apsw.Error)


def test_inference_log_struct_matches_the_table(db: Database) -> None:
    columns = db.read(
        lambda conn: [(row[1], bool(row[3])) for row in conn.execute("PRAGMA table_info(inference_logs)")]
    )
    fields = [
        (field.name, field.name != "id" and types.NoneType not in typing.get_args(field.type))
        for field in msgspec.structs.fields(InferenceLog)
    ]
    assert columns == fields  # (name, NOT NULL) in order; id is the rowid, never NULL once stored


def test_record_and_recent_round_trip(db: Database) -> None:
    full = make_log(1, key_id="key-1", ttfb_ms=12.25, status="error", http_status=502, error="upstream closed")
    sparse = make_log(2)  # key_id, ttfb_ms, error stay None
    full_id = logs.record(db, full).result(timeout=5)
    sparse_id = logs.record(db, sparse).result(timeout=5)
    assert sparse_id > full_id

    rows = logs.recent(db)
    assert rows == [
        msgspec.structs.replace(sparse, id=sparse_id),
        msgspec.structs.replace(full, id=full_id),
    ]  # newest first
    assert rows[0].key_id is None and rows[0].ttfb_ms is None and rows[0].error is None
    assert logs.recent(db, request_id="req-1") == [msgspec.structs.replace(full, id=full_id)]
    assert logs.recent(db, limit=1) == [msgspec.structs.replace(sparse, id=sparse_id)]
    assert logs.recent(db, limit=0) == []
    assert count_by_status(db) == {"ok": 1, "error": 1, "cancelled": 0}


def test_check_constraint_rejects_a_bad_status(db: Database) -> None:
    future = logs.record(db, make_log(status="exploded"))
    with pytest.raises(StoreConstraintError) as info:
        future.result(timeout=5)
    assert isinstance(info.value.__cause__, apsw.ConstraintError)
    assert logs.recent(db) == []  # rolled back
    assert logs.record(db, make_log()).result(timeout=5) > 0  # and the writer lives on


def test_a_batch_stores_every_row_but_a_refused_one(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    rows = [make_log(1), make_log(2, status="exploded"), make_log(3)]
    assert logs.record_many(db, rows).result(timeout=5) == 2
    assert [row.request_id for row in logs.recent(db)] == ["req-3", "req-1"]
    assert db.dropped_rows() == {"inference_logs": 1}
    assert "could not record an inference log row" in caplog.text
    assert logs.record_many(db, [make_log(4), make_log(5)]).result(timeout=5) == 2  # the fast path


def test_a_failing_job_is_rolled_back_and_its_own_error_passes_through(db: Database) -> None:
    def half_then_fail(conn: apsw.Connection) -> None:
        conn.execute(
            "INSERT INTO training_jobs (id, status, base_model, dataset_path, created_at) "
            "VALUES ('j', 'queued', 'm', 'd', 0)"
        )
        raise LookupError("caller's own bug")

    with pytest.raises(LookupError):
        db.submit(half_then_fail).result(timeout=5)
    assert db.read(lambda conn: conn.execute("SELECT count(*) FROM training_jobs").get) == 0
    # The transaction really ended: the next job can begin its own and commit.
    assert db.write("DELETE FROM inference_logs").result(timeout=5) == 0


def test_concurrent_records_all_land_and_close_flushes(db_path: Path) -> None:
    database = Database.open(db_path)
    threads, per_thread = 8, 250
    start = threading.Barrier(threads)

    def produce(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            logs.record(database, make_log(t * per_thread + i))

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    database.close()  # no future was awaited: close() alone must commit them all

    reopened = Database.open(db_path)
    try:
        assert count_by_status(reopened)["ok"] == threads * per_thread
        ids = reopened.read(lambda conn: {row[0] for row in conn.execute("SELECT request_id FROM inference_logs")})
        assert ids == {f"req-{n}" for n in range(threads * per_thread)}
    finally:
        reopened.close()


def test_reads_from_several_threads_use_their_own_connections(db: Database) -> None:
    logs.record(db, make_log()).result(timeout=5)
    seen: list[tuple[apsw.Connection, int]] = []
    lock = threading.Lock()

    def read() -> None:
        count = count_by_status(db)["ok"]
        with lock:
            seen.append((db.reader(), count))

    readers = [threading.Thread(target=read) for _ in range(4)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join()
    assert [count for _, count in seen] == [1, 1, 1, 1]
    assert len({id(conn) for conn, _ in seen}) == 4
    assert db.reader() is db.reader()


def test_readers_cannot_write(db: Database) -> None:
    with pytest.raises(StoreError):
        db.read(lambda conn: conn.execute("DELETE FROM inference_logs"))


def test_close_is_idempotent_and_later_use_is_refused(db_path: Path) -> None:
    database = Database.open(db_path)
    assert database.health() is None
    database.close()
    database.close()
    with pytest.raises(StoreError, match="closed"):
        database.submit(lambda conn: None)
    with pytest.raises(StoreError, match="closed"):
        logs.record(database, make_log())
    with pytest.raises(StoreError, match="closed"):
        logs.recent(database)
    assert database.health() is not None


def test_health_ok(db: Database) -> None:
    assert db.health() is None


def test_health_reports_a_broken_read(db: Database, db_path: Path) -> None:
    # A file that vanished is a broken read even for root, whom permissions do not stop.
    moved = db_path.with_name("moved.db")
    db_path.rename(moved)
    try:
        problem = db.health()
    finally:
        moved.rename(db_path)
    assert problem is not None and "for reading" in problem


@pytest.mark.anyio
async def test_awrite_and_asubmit(db: Database) -> None:
    changed = await db.awrite(
        "INSERT INTO training_jobs (id, status, base_model, dataset_path, created_at)"
        " VALUES (?, 'queued', 'm', 'd', 0)",
        ("job-1",),
    )
    assert changed == 1
    status = await db.asubmit(lambda conn: conn.execute("SELECT status FROM training_jobs WHERE id = 'job-1'").get)
    assert status == "queued"


@pytest.mark.anyio
async def test_call_awaits_a_store_function_off_the_event_loop(db: Database) -> None:
    """``db.call(fn, ...)`` runs ``fn(db, ...)`` in a worker thread (its reads block on the disk) and
    passes its result and its errors through."""
    loop_thread = threading.get_ident()

    def count_jobs(database: Database, status: str) -> tuple[int, bool]:
        found = database.read(
            lambda conn: conn.execute("SELECT count(*) FROM training_jobs WHERE status = ?", (status,)).get
        )
        return found, threading.get_ident() != loop_thread

    assert await db.call(count_jobs, "queued") == (0, True)

    def refused(database: Database) -> None:
        database.read(lambda conn: conn.execute("SELECT nothing FROM no_such_table").get)

    with pytest.raises(StoreError):
        await db.call(refused)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # awrite awaits through asyncio.wrap_future


def test_an_uncreatable_folder_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(StoreError) as info:
        Database.open(blocker / "locopilot.db")
    assert isinstance(info.value.__cause__, OSError)
