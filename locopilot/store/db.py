"""The SQLite file that holds locopilot's state: one writer thread, per-thread readers.

A :class:`Database` owns one apsw connection on a daemon writer thread, fed by an
unbounded queue, and one read-only connection per calling thread. Writes never block
the caller: :meth:`Database.submit` enqueues a function and returns a
``concurrent.futures.Future``; the writer runs it inside ``BEGIN IMMEDIATE … COMMIT``.
Reads run on the calling thread, each inside one read transaction, so a read sees one
snapshot. Async code awaits a store function with :meth:`Database.call` (as datasette's
``execute_fn`` beside ``execute_write_fn``; here :meth:`Database.asubmit`), which runs it in a
worker thread: the event loop never waits on the disk, and no caller sees the thread.

Errors. apsw exceptions are translated here, by type, and never escape a public method:

    StoreError                  anything the store could not do (apsw.Error; OSError in open)
    ├── StoreBusy               the file stayed locked past the busy timeout
    └── StoreConstraintError    a NOT NULL, CHECK, UNIQUE or FOREIGN KEY rule refused a row

An exception raised by a caller's own function is passed through its future unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeAlias, TypeVar

import anyio
import apsw

_log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: apsw's ``bestpractice`` sets 100 ms. A server whose CLI (``locopilot keys add``) or a
#: second process may hold the write lock for a moment wants to wait seconds, not fail.
BUSY_TIMEOUT_MS = 5000

_SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")


class StoreError(Exception):
    """The state database could not do what was asked; the message says what and why."""


class StoreBusy(StoreError):
    """The database stayed locked by another connection for longer than the busy timeout."""


class StoreConstraintError(StoreError):
    """A schema rule (NOT NULL, CHECK, UNIQUE, FOREIGN KEY) refused the change."""


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Re-raise apsw errors met while doing ``action`` as :class:`StoreError`, by type.

    Only apsw errors: a caller's function run under this keeps its own exceptions.
    """
    try:
        yield
    except (apsw.BusyError, apsw.LockedError) as exc:
        raise StoreBusy(f"{action}: database is locked ({exc})") from exc
    except apsw.ConstraintError as exc:
        raise StoreConstraintError(f"{action}: {exc}") from exc
    except apsw.Error as exc:
        raise StoreError(f"{action}: {exc}") from exc


@contextlib.contextmanager
def write_transaction(conn: apsw.Connection) -> Iterator[None]:
    """Run the block in ``BEGIN IMMEDIATE``; commit if it returns, roll back if it raises.

    IMMEDIATE takes the write lock up front, so a second process holding it makes us
    wait out the busy timeout here instead of failing halfway through the block with a
    stale snapshot. The block must not end the transaction itself; nested ``with conn:``
    savepoints are fine. apsw errors are not translated here.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself after some errors (disk full, I/O); a second
        # ROLLBACK would raise and hide the error that matters.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _configure(conn: apsw.Connection) -> None:
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    # Double-quoted string literals turn a misspelt "column" into a silent string.
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)


def _restrict_permissions(path: Path) -> None:
    """Make the data folder 0700 and the database (and any journal files) 0600.

    We create the database file ourselves, 0600, before SQLite opens it: SQLite gives
    the -wal, -shm and -journal files it creates the database file's mode, so they are
    0600 too, whatever the process umask. That avoids ``os.umask``, which is
    process-wide and would race every other thread creating files. Files and folders
    that already exist are tightened only if they are ours.
    """
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder_stat = folder.stat()
    if folder_stat.st_uid == os.getuid() and stat.S_IMODE(folder_stat.st_mode) != 0o700:
        folder.chmod(0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        file_stat = os.fstat(fd)
        if file_stat.st_uid == os.getuid() and stat.S_IMODE(file_stat.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in _SIDECAR_SUFFIXES:
        sidecar = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):  # absent is the usual case
            sidecar_stat = sidecar.stat()
            if sidecar_stat.st_uid == os.getuid() and stat.S_IMODE(sidecar_stat.st_mode) != 0o600:
                sidecar.chmod(0o600)


class _ReaderSlot(threading.local):
    conn: apsw.Connection | None = None


_Job: TypeAlias = tuple[Callable[[apsw.Connection], Any], Future[Any]]


class Database:
    """One SQLite state file. Build it with :meth:`open`; call :meth:`close` when done.

    Thread-safe: any thread may submit writes or read. A daemon writer thread means
    writes still queued when the process exits without :meth:`close` are lost.
    """

    def __init__(self, path: Path, writer: apsw.Connection) -> None:
        """Take ownership of ``writer``, already configured and migrated. Use :meth:`open`."""
        self.path = path
        self._writer = writer
        # Unbounded on purpose: a caller must never wait on the disk. Request logging
        # adds one small row per request, far below what one SQLite writer commits.
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Guards _closed/_writer_stopped against submit(), so no job can be enqueued
        # after the stop marker or after a dead writer has drained the queue.
        self._lock = threading.Lock()
        self._closed = False
        self._writer_stopped = False
        self._dropped: dict[str, int] = {}
        self._local = _ReaderSlot()
        # Weak, so a reader dies with its thread (anyio retires idle worker threads);
        # close() closes those still alive.
        self._readers: weakref.WeakSet[apsw.Connection] = weakref.WeakSet()
        self._thread = threading.Thread(target=self._run_writer, name=f"locopilot-db-writer:{path.name}", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: Path) -> Database:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date.

        Creates the parent folder 0700 and the file 0600, turns on WAL, ``synchronous=NORMAL``
        and foreign keys, and applies pending migrations before returning.

        Raises:
            StoreError: the folder or file cannot be made, the file is not a database,
                WAL is unavailable, or the database is newer than this code.
        """
        # Imported here, not at the top: migrations imports StoreError from this module.
        from locopilot.store.migrations import migrate

        try:
            _restrict_permissions(path)
        except OSError as exc:
            raise StoreError(f"cannot create database {path}: {exc}") from exc
        with _translated(f"cannot open database {path}"):
            conn = apsw.Connection(str(path))
        try:
            with _translated(f"cannot prepare database {path}"):
                _configure(conn)
                mode = conn.pragma("journal_mode", "wal")
                if mode != "wal":
                    raise StoreError(f"database {path}: WAL journal mode is unavailable (got {mode!r})")
                # NORMAL in WAL loses at most the last commits on power loss, never the file.
                conn.pragma("synchronous", "NORMAL")
                conn.pragma("foreign_keys", "ON")
                migrate(conn)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    # -- writes ---------------------------------------------------------------------

    def submit(self, fn: Callable[[apsw.Connection], T]) -> Future[T]:
        """Queue ``fn(conn)`` to run on the writer thread in one write transaction.

        Returns at once. The future holds ``fn``'s result once committed; if ``fn`` or the
        commit fails, the transaction is rolled back and the future holds the error
        (apsw errors as :class:`StoreError`, anything else as ``fn`` raised it). Jobs run
        one at a time in submission order. Cancelling the future before the job starts
        skips it.

        Raises:
            StoreError: the database is closed or its writer thread has stopped.
        """
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise StoreError(f"database {self.path} is closed")
            if self._writer_stopped or not self._thread.is_alive():
                raise StoreError(f"database {self.path}: the writer thread has stopped")
            self._queue.put((fn, future))
        return future

    def write(self, sql: str, params: apsw.Bindings | None = None) -> Future[int]:
        """Queue one statement; the future holds the number of rows it changed."""

        def run(conn: apsw.Connection) -> int:
            conn.execute(sql, params)
            return conn.changes()

        return self.submit(run)

    def insert(self, table: str, row: dict[str, Any], what: str) -> Future[int]:
        """Queue one INSERT of ``row`` (column name → value) into ``table``; the future holds the new row id.

        ``table`` and the column names must be the caller's constants, never input.
        A failed insert is also logged ("could not record {what}"), so a caller that
        drops the future never loses a row silently.
        """
        sql = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + name for name in row)})"  # noqa: S608

        def run(conn: apsw.Connection) -> int:
            conn.execute(sql, row)
            return conn.last_insert_rowid()

        def report(future: Future[int]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                self._drop(table)
                _log.error("could not record %s: %s", what, exc, exc_info=exc)

        try:
            future = self.submit(run)
        except StoreError:
            self._drop(table)
            raise
        future.add_done_callback(report)
        return future

    def insert_many(self, table: str, rows: list[dict[str, Any]], what: str) -> Future[int]:
        """Queue the INSERT of ``rows`` (each with the same columns) into ``table``, in one
        transaction; the future holds how many were stored.

        As :meth:`insert`, for several rows at the cost of one commit. A row the database
        refuses (a constraint) is dropped alone and logged; the others are stored. If the
        transaction itself fails, every row is dropped and logged.
        """
        columns = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + name for name in columns)})"  # noqa: S608

        def run(conn: apsw.Connection) -> int:
            try:
                with conn:  # a savepoint: a refused row undoes only this attempt
                    conn.executemany(sql, rows)
                return len(rows)
            except apsw.ConstraintError:
                pass
            stored = 0
            for row in rows:  # one savepoint per row, to find the refused ones
                try:
                    with conn:
                        conn.execute(sql, row)
                    stored += 1
                except apsw.ConstraintError as exc:
                    self._drop(table)
                    _log.error("could not record %s: %s", what, exc, exc_info=exc)
            return stored

        def report(future: Future[int]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                self._drop(table, len(rows))
                _log.error("could not record %d rows (%s): %s", len(rows), what, exc, exc_info=exc)

        try:
            future = self.submit(run)
        except StoreError:
            self._drop(table, len(rows))
            raise
        future.add_done_callback(report)
        return future

    def _drop(self, table: str, count: int = 1) -> None:
        with self._lock:
            self._dropped[table] = self._dropped.get(table, 0) + count

    def dropped_rows(self) -> dict[str, int]:
        """Since open, by table: rows :meth:`insert` was given but could not store."""
        with self._lock:
            return dict(self._dropped)

    def queue_depth(self) -> int:
        """Writes queued and not yet started (approximate while the writer runs)."""
        return self._queue.qsize()

    async def asubmit(self, fn: Callable[[apsw.Connection], T]) -> T:
        """:meth:`submit` and await the result on the running asyncio loop.

        Cancelling the awaiting task does not cancel the write: once submitted, it runs.
        """
        # asyncio: the writer thread completes a concurrent Future, and wrap_future hands its result to the
        # loop with one call_soon_threadsafe; anyio has no such bridge short of a worker thread blocked on it.
        return await asyncio.shield(asyncio.wrap_future(self.submit(fn)))

    async def awrite(self, sql: str, params: apsw.Bindings | None = None) -> int:
        """:meth:`write` and await the changed-row count; cancellation as :meth:`asubmit`."""
        return await asyncio.shield(asyncio.wrap_future(self.write(sql, params)))  # as asubmit

    def _run_writer(self) -> None:
        conn = self._writer
        try:
            while (job := self._queue.get()) is not None:
                self._run_job(conn, *job)
        finally:
            with self._lock:
                self._writer_stopped = True
                leftovers: list[_Job] = []
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        leftovers.append(item)
            for _, future in leftovers:
                if future.set_running_or_notify_cancel():
                    future.set_exception(StoreError(f"database {self.path}: the writer thread has stopped"))
            # Closed last, after the readers, so this connection checkpoints and removes the WAL.
            conn.close()

    @staticmethod
    def _run_job(conn: apsw.Connection, fn: Callable[[apsw.Connection], Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with _translated("write failed"), write_transaction(conn):
                result = fn(conn)
        # The failure belongs to whoever submitted the job, and the writer must outlive
        # any one bad job; this is what ThreadPoolExecutor does too.
        except BaseException as exc:  # noqa: BLE001
            future.set_exception(exc)
        else:
            future.set_result(result)

    # -- reads ----------------------------------------------------------------------

    def reader(self) -> apsw.Connection:
        """This thread's read-only connection, opened on first use.

        Use it from this thread only. apsw errors raised while using it directly are not
        translated; prefer :meth:`read`.

        Raises:
            StoreError: the database is closed, or the connection cannot be opened.
        """
        conn = self._local.conn
        if conn is not None and not self._closed:
            return conn
        if self._closed:
            raise StoreError(f"database {self.path} is closed")
        with _translated(f"cannot open database {self.path} for reading"):
            conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
            _configure(conn)
        with self._lock:
            if self._closed:
                conn.close()
                raise StoreError(f"database {self.path} is closed")
            self._readers.add(conn)
        self._local.conn = conn
        return conn

    def read(self, fn: Callable[[apsw.Connection], T]) -> T:
        """Run ``fn`` on this thread's read connection, in one read transaction (one snapshot).

        Blocks the calling thread; from async code run it in a worker thread. apsw errors
        become :class:`StoreError`; others pass through.
        """
        conn = self.reader()
        with _translated("read failed"), conn:
            result = fn(conn)
        return result

    async def call(self, fn: Callable[Concatenate[Database, P], T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(self, *args, **kwargs)``: a store function (``locopilot.store.*``), which reads on its
        thread and may wait for its writes, run in a worker thread. Raises what ``fn`` raises."""
        return await anyio.to_thread.run_sync(functools.partial(fn, self, *args, **kwargs))

    def health(self) -> str | None:
        """Say what is wrong with the database, or return None if nothing is.

        None means the writer thread is running and a trivial query works on this
        thread's read connection.
        """
        if self._closed:
            return f"database {self.path} is closed"
        if self._writer_stopped or not self._thread.is_alive():
            return f"database {self.path}: the writer thread has stopped"
        try:
            self.read(lambda conn: conn.execute("SELECT count(*) FROM sqlite_schema").get)
        except StoreError as exc:
            return str(exc)
        return None

    # -- shutdown -------------------------------------------------------------------

    def close(self) -> None:
        """Commit every write submitted before this call, stop the writer, close all connections.

        Blocks until the queue is drained. Idempotent: later calls return at once (a
        concurrent second call may return before the first has finished draining).
        Call it once reads have stopped: a read connection in use by another thread
        cannot be closed under it.

        Raises:
            StoreError: a read connection could not be closed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
            readers = list(self._readers)
            self._readers.clear()
        try:
            with _translated(f"cannot close database {self.path}"):
                for conn in readers:
                    conn.close()
        finally:
            self._thread.join()
