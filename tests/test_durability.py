"""Crashes: kill -9 under load loses nothing a client was told about, and leaves nothing running.

The server runs in a process group of its own, so one ``killpg(SIGKILL)`` takes granian's
main process and its worker at the same instant, as a crash of the whole service would.
Requests go to a fast fake upstream (tests/fakes/fault_upstream.py), so a cycle is cheap.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import httpx
import pytest

from locopilot.store.db import Database
from tests.conftest import SMOL, Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.test_engine_lifecycle import runners, wait_until

ADMIN_KEY = "sk-durability-admin-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CYCLES = 5


@pytest.fixture
def upstream() -> Iterator[FaultUpstream]:
    fake = FaultUpstream().start()
    yield fake
    fake.stop()


def process_tree(root: int) -> set[int]:
    """``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it has just exited
            parent = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Load:
    """Client threads that send requests and create keys until stopped, noting what was acknowledged:
    a reply read to its end (the JSON body, or a stream's ``[DONE]``), a key's 201 with its id."""

    def __init__(self, server: Server, cycle: int, kill_after: int) -> None:
        self.server = server
        self.cycle = cycle
        self.kill_after = kill_after
        self.killed = threading.Event()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.replies: set[str] = set()
        self.keys: set[str] = set()
        self.sent = 0
        self.threads = [threading.Thread(target=self._requests, args=(n,)) for n in range(3)]
        self.threads.append(threading.Thread(target=self._keys))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _requests(self, worker: int) -> None:
        with httpx.Client(base_url=self.server.url, headers=AUTH, timeout=10) as client:
            for n in itertools.count():
                if self.stopping.is_set():
                    return
                request_id = f"dur-{self.cycle}-{worker}-{n}"
                body = {"model": "fault:fault-small", "messages": [{"role": "user", "content": "hi"}], "stream": n % 2}
                headers = {"X-Request-Id": request_id}
                self.sent += 1
                try:
                    if body["stream"]:
                        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                            lines = [line for line in response.iter_lines() if line]
                        if response.status_code == 200 and lines[-1] == "data: [DONE]":
                            self._acknowledged(request_id)
                    else:
                        response = client.post("/v1/chat/completions", json=body, headers=headers)
                        if response.status_code == 200 and response.json()["choices"]:
                            self._acknowledged(request_id)
                except (httpx.HTTPError, json.JSONDecodeError, IndexError):
                    time.sleep(0.05)  # the server is down: until it is stopped, keep trying

    def _acknowledged(self, request_id: str) -> None:
        """Note the reply; the one that reaches ``kill_after`` kills the server at once, so
        the kill lands right after a reply went out, where a row not yet committed would be lost."""
        with self.lock:
            if self.killed.is_set():
                return  # answered by the dying server after the kill: too late to count on
            self.replies.add(request_id)
            if len(self.replies) >= self.kill_after:
                assert self.server.process is not None
                os.killpg(self.server.process.pid, signal.SIGKILL)
                self.killed.set()

    def _keys(self) -> None:
        with httpx.Client(base_url=self.server.url, headers=AUTH, timeout=10) as client:
            for n in itertools.count():
                if self.stopping.is_set():
                    return
                try:
                    response = client.post("/v1/admin/keys", json={"name": f"k-{self.cycle}-{n}"})
                    if response.status_code == 201:
                        self.keys.add(response.json()["id"])
                except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                    time.sleep(0.05)


def read_state(db_path: Path) -> tuple[str, set[str], set[str]]:
    """(integrity_check's answer, request ids in the log, key ids) as another process sees them."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        integrity = "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))
        request_ids = {str(row[0]) for row in conn.execute("SELECT request_id FROM inference_logs")}
        key_ids = {str(row[0]) for row in conn.execute("SELECT id FROM api_keys")}
    finally:
        conn.close()
    return integrity, request_ids, key_ids


def test_kill_9_under_load_loses_no_acknowledged_row(tmp_path: Path, upstream: FaultUpstream) -> None:
    upstreams = [{"name": "fault", "url": upstream.url, "locality": "local"}]
    server = Server(tmp_path, {}, {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY, "LOCOPILOT_UPSTREAMS": json.dumps(upstreams)})
    server.new_session = True
    acknowledged_replies: set[str] = set()
    acknowledged_keys: set[str] = set()
    totals = []
    try:
        for cycle in range(CYCLES):
            server.start(path="/health")
            with Load(server, cycle, kill_after=20) as load:
                assert load.killed.wait(300), "the server has answered 20 requests"
                assert server.process is not None
                server.process.wait()
            acknowledged_replies |= load.replies
            acknowledged_keys |= load.keys
            integrity, request_ids, key_ids = read_state(server.db_path)
            assert integrity == "ok"
            assert acknowledged_replies - request_ids == set(), f"cycle {cycle}: acknowledged replies not in the log"
            assert acknowledged_keys - key_ids == set(), f"cycle {cycle}: acknowledged keys missing"
            totals.append((cycle, load.sent, len(load.replies), len(load.keys), len(request_ids), len(key_ids)))
        server.start(path="/health")
        integrity, request_ids, key_ids = read_state(server.db_path)
        assert integrity == "ok"
        assert acknowledged_replies <= request_ids
        assert acknowledged_keys <= key_ids
    finally:
        server.stop()
    # For the issue note: cycle, requests sent, replies and keys acknowledged, rows and keys stored so far.
    print("durability:", totals)


def test_a_worker_whose_main_process_died_stops_and_takes_its_runner(tmp_path: Path, smollm2_path: Path) -> None:
    """kill -9 of granian's main process alone: its worker would go on serving the port beside the next
    server. It notices, stops, and its runner ends with it; a restart then starts with nothing loaded."""
    server = Server(tmp_path, {SMOL: smollm2_path})
    server.new_session = True
    server.start()
    try:
        client = server.client()
        client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        (runner,) = runners(server)
        assert server.process is not None
        tree = process_tree(server.process.pid)
        assert runner["pid"] in tree  # a grandchild: main → worker → runner
        server.process.kill()
        server.process.wait()
        wait_until(lambda: not any(alive(pid) for pid in tree), "the orphaned worker and its runner exit", 600)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)
        server.start()
        health = server.engine_health()
        assert health["engine"]["runners"] == []  # type: ignore[index]
        assert health["engine"]["loaded_models"] == []  # type: ignore[index]
        assert "the main process is gone" in server.log_path.read_text()
    finally:
        server.stop()


def test_startup_marks_jobs_left_running_by_a_crash_failed(tmp_path: Path) -> None:
    """The only state in the database that says "running" is a training job's."""
    server = Server(tmp_path, {})
    db = Database.open(server.db_path)
    try:
        for job_id, status in (("crashed", "running"), ("waiting", "queued"), ("done", "succeeded")):
            db.write(
                "INSERT INTO training_jobs (id, status, base_model, dataset_path, created_at)"
                " VALUES (?, ?, 'm', 'd', 0)",
                (job_id, status),
            ).result()
    finally:
        db.close()
    server.start(path="/health")
    try:

        def read() -> tuple[dict[str, str], dict[str, str]]:
            conn = apsw.Connection(str(server.db_path), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                rows = conn.execute("SELECT id, status, error FROM training_jobs").fetchall()
            finally:
                conn.close()
            return {row[0]: row[1] for row in rows}, {row[0]: row[2] for row in rows}

        # A queued job never started, so it runs now (and fails here: its base model 'm' does not exist).
        deadline = time.monotonic() + 30
        while (states := read()[0])["waiting"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.2)
        states, errors = read()
        assert states == {"crashed": "failed", "waiting": "failed", "done": "succeeded"}
        assert "interrupted" in errors["crashed"]
        assert "base model" in errors["waiting"]
    finally:
        server.stop()
