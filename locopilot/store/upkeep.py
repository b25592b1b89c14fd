"""Keeping the database bounded, copyable and true: retention of old rows, online backup,
and recovery of state a crash left behind.

Retention deletes request-log and audit rows older than the cut-off in batches
of :data:`PURGE_BATCH` rows, each batch its own write transaction on the
writer thread, so request logging never waits behind one long delete.

A backup copies the live database with SQLite's online backup API from a
connection of its own: consistent at one moment even while the server writes,
and never blocking the writer for more than a step of pages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path

import apsw

from locopilot.store.db import Database, StoreError

PURGE_BATCH = 500
"""Rows deleted per write transaction."""

BACKUP_PAGES_PER_STEP = 256

# Tables with a created_at column whose old rows retention removes; names are constants, never input.
RETAINED_TABLES = ("inference_logs", "audit_events")


def purge_before(db: Database, cutoff: float) -> int:
    """Delete log and audit rows created before ``cutoff`` (unix seconds); the number deleted."""
    deleted = 0
    for table in RETAINED_TABLES:
        sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE created_at < ? LIMIT ?)"  # noqa: S608
        while True:
            changed = db.write(sql, (cutoff, PURGE_BATCH)).result()
            deleted += changed
            if changed < PURGE_BATCH:
                break
    return deleted


def purge_older_than(db: Database, days: int, now: float | None = None) -> int:
    """:func:`purge_before` the moment ``days`` days before ``now``; 0 days keeps everything."""
    if days <= 0:
        return 0
    return purge_before(db, (time.time() if now is None else now) - days * 86400)


def backup(source: Path, target: Path) -> None:
    """Copy the database at ``source`` to a new file ``target`` (mode 0600), safely while it is in use.

    The copy is written beside ``target`` and renamed into place when complete,
    so ``target`` is never a half-written database.

    Raises:
        StoreError: ``target`` exists, or the copy failed.
    """
    if target.exists():
        raise StoreError(f"{target} already exists; choose a new file name")
    if not source.is_file():
        raise StoreError(f"no database at {source}")
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        live = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
        copy = apsw.Connection(str(partial))
        try:
            live.set_busy_timeout(5000)
            with copy.backup("main", live, "main") as step:
                while not step.done:
                    step.step(BACKUP_PAGES_PER_STEP)
            (result,) = copy.execute("PRAGMA integrity_check").fetchone() or ("no answer",)
            if result != "ok":
                raise StoreError(f"the copy failed its integrity check: {result}")
        finally:
            copy.close()
            live.close()
        partial.rename(target)
    except (apsw.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"backup to {target} failed: {exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def fail_interrupted_jobs(db: Database, now: float, resumable: Collection[str] = ()) -> int:
    """Mark training jobs still ``running`` here as failed: called at startup, when nothing can be
    running yet, so those are what a crash or kill left behind. Returns how many. Those in
    ``resumable`` (they have a checkpoint) are queued again instead, with an event saying so. A
    job that runs on a remote locopilot is left alone: it runs on, and is followed again.

    Raises:
        StoreError: the write failed.
    """
    from locopilot.store import jobs

    for job_id in resumable:
        if jobs.transition(db, job_id, ("running",), status="queued"):
            jobs.add_event(db, job_id, now, "The server restarted; the job resumes from its last checkpoint")
    failed: int = db.write(
        "UPDATE training_jobs SET status = 'failed', error = ?, error_code = 'interrupted', finished_at = ? "
        "WHERE status = 'running' AND remote IS NULL",
        ("interrupted: the server stopped while the job ran, and it had no checkpoint", now),
    ).result()
    return failed
