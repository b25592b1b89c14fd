"""Retention and backup of the state database, on real files."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from locopilot.store import audit, logs
from locopilot.store.db import Database, StoreError
from locopilot.store.upkeep import PURGE_BATCH, backup, purge_older_than
from tests.conftest import Server
from tests.test_api import log_rows
from tests.test_cli import invoke, make_env
from tests.test_store import make_log

NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "data" / "locopilot.db")
    yield database
    database.close()


def count(db: Database, table: str) -> int:
    return int(db.read(lambda conn: conn.execute(f"SELECT count(*) FROM {table}").get))


def test_retention_deletes_only_old_rows_in_batches(db: Database) -> None:
    old = PURGE_BATCH * 2 + 7  # more than one batch, and not a multiple of it
    for n in range(old):
        logs.record(db, make_log(n, created_at=NOW - 31 * DAY))
    for n in range(old, old + 5):
        logs.record(db, make_log(n, created_at=NOW - 29 * DAY))
    audit.record(db, audit.AuditEvent(created_at=NOW - 40 * DAY, event="auth_failed"))
    audit.record(db, audit.AuditEvent(created_at=NOW - DAY, event="auth_failed")).result()

    assert purge_older_than(db, 30, now=NOW) == old + 1
    assert count(db, "inference_logs") == 5
    assert count(db, "audit_events") == 1
    assert purge_older_than(db, 30, now=NOW) == 0


def test_zero_days_keeps_everything(db: Database) -> None:
    logs.record(db, make_log(created_at=NOW - 3650 * DAY)).result()
    assert purge_older_than(db, 0, now=NOW) == 0
    assert count(db, "inference_logs") == 1


def test_backup_while_the_writer_writes_is_a_consistent_copy(db: Database, tmp_path: Path) -> None:
    queued = [logs.record(db, make_log(n)) for n in range(2000)]
    queued[-1].result()  # the writer runs jobs in order: all 2000 are committed
    stop = threading.Event()

    def keep_writing() -> None:
        n = 10_000
        while not stop.is_set():
            logs.record(db, make_log(n)).result()
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        target = tmp_path / "copy.db"
        backup(db.path, target)
    finally:
        stop.set()
        writer.join()
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    copy = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert copy.execute("PRAGMA integrity_check").get == "ok"
        copied = copy.execute("SELECT count(*) FROM inference_logs").get
        assert isinstance(copied, int) and 2000 <= copied <= count(db, "inference_logs")
        # One moment's state: every row up to the newest copied one, none missing in between.
        ids = [row[0] for row in copy.execute("SELECT id FROM inference_logs ORDER BY id")]
        assert ids == list(range(1, len(ids) + 1))
    finally:
        copy.close()
    assert not list(tmp_path.glob(".*.partial"))


def test_backup_never_overwrites(db: Database, tmp_path: Path) -> None:
    target = tmp_path / "exists.db"
    target.write_bytes(b"precious")
    with pytest.raises(StoreError, match="already exists"):
        backup(db.path, target)
    assert target.read_bytes() == b"precious"


def test_backup_of_a_missing_database_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no database"):
        backup(tmp_path / "none.db", tmp_path / "copy.db")
    assert not (tmp_path / "copy.db").exists()


# The commands


def test_backup_and_stats_commands(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    database = Database.open(tmp_path / "data" / "locopilot.db")
    try:
        now = time.time()
        logs.record(database, make_log(1, model="alpha", tokens_in=5, tokens_out=7, created_at=now - 60))
        logs.record(database, make_log(2, model="alpha", tokens_in=1, tokens_out=2, created_at=now - 60))
        logs.record(database, make_log(3, model="beta", status="error", http_status=503, created_at=now - 60))
        logs.record(database, make_log(4, model="gamma", created_at=now - 3 * 3600)).result()
    finally:
        database.close()

    listed = invoke(env, "stats", "--hours", "1").stdout
    (alpha,) = [line.split() for line in listed.splitlines() if " alpha " in line]
    assert alpha == ["(no", "key)", "alpha", "2", "2", "0", "6", "9", alpha[-1]]
    assert " beta " in listed
    assert "gamma" not in listed  # older than the window
    assert "gamma" in invoke(env, "stats", "--hours", "4").stdout

    target = tmp_path / "backup.db"
    invoke(env, "backup", str(target))
    copy = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert copy.execute("SELECT count(*) FROM inference_logs").get == 4
    finally:
        copy.close()
    again = invoke(env, "backup", str(target), code=1)
    assert "already exists" in again.stderr


def test_the_server_deletes_old_rows_at_start(tmp_path: Path) -> None:
    server = Server(tmp_path, {}, env={"LOCOPILOT_LOG_RETENTION_DAYS": "7"})
    database = Database.open(server.db_path)
    try:
        now = time.time()
        logs.record(database, make_log(1, request_id="old", created_at=now - 8 * DAY))
        logs.record(database, make_log(2, request_id="recent", created_at=now - 6 * DAY)).result()
    finally:
        database.close()
    server.start(path="/health")
    try:
        for _ in range(200):
            left = [str(row["request_id"]) for row in log_rows(server, "request_id IN ('old', 'recent')")]
            if left == ["recent"]:
                break
            time.sleep(0.1)
        assert left == ["recent"]
    finally:
        server.stop()
