"""SIGTERM: streams in flight finish (or, past the grace, end with an error event), the exit is clean."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOL, Server
from tests.test_api import log_rows
from tests.test_durability import alive, process_tree
from tests.test_engine_lifecycle import ENDLESS, LONG, wait_until


class Streams:
    """Streamed chats on threads; each keeps its SSE data lines and says when its first text came."""

    def __init__(self, server: Server, count: int, **body: object) -> None:
        self.url = f"{server.url}/v1/chat/completions"
        self.body = {"model": SMOL, "messages": LONG, "stream": True, "temperature": 0, **body}
        self.lines: list[list[str]] = [[] for _ in range(count)]
        self.request_ids: list[str] = [""] * count
        self.started = [threading.Event() for _ in range(count)]
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._stream, args=(n,)) for n in range(count)]
        for thread in self.threads:
            thread.start()

    def _stream(self, n: int) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=600) as response:
                assert response.status_code == 200
                self.request_ids[n] = response.headers["x-request-id"]
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.lines[n].append(line)
                        if '"content":"' in line and '"content":""' not in line:
                            self.started[n].set()
        except BaseException as exc:  # kept for join() to report
            self.errors.append(exc)
        finally:
            self.started[n].set()

    def wait_started(self) -> None:
        for event in self.started:
            assert event.wait(600), "a stream has its first text"

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=600)
            assert not thread.is_alive()
        assert self.errors == []


def sigterm(server: Server) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)


def wal_bytes(server: Server) -> int:
    wal = server.db_path.with_name(server.db_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


@pytest.fixture
def make_server(tmp_path: Path, smollm2_path: Path) -> Iterator[object]:
    servers: list[Server] = []

    def make(grace: str) -> Server:
        server = Server(tmp_path / f"s{len(servers)}", {SMOL: smollm2_path}, {"LOCOPILOT_SHUTDOWN_GRACE": grace})
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_sigterm_lets_streams_in_flight_finish_and_exits_0(make_server: object) -> None:
    assert callable(make_server)
    server: Server = make_server("600")
    streams = Streams(server, 3, max_tokens=12)
    streams.wait_started()
    sigterm(server)
    # granian stops accepting at once: a new connection is refused while the streams go on.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
    streams.join()
    for lines in streams.lines:
        assert lines[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in lines)
    assert server.process is not None
    assert server.process.wait(timeout=600) == 0
    for request_id in streams.request_ids:
        (row,) = log_rows(server, "request_id = ?", request_id)
        assert (row["status"], row["http_status"]) == ("ok", 200)
    assert wal_bytes(server) == 0
    log = server.log_path.read_text()
    assert "requests in flight have 600 s to finish" in log
    assert "stopped: database closed, 0 bytes left in its WAL" in log


def test_streams_still_running_when_the_grace_ends_get_an_error_event(make_server: object) -> None:
    assert callable(make_server)
    server: Server = make_server("1")
    streams = Streams(server, 2, max_tokens=4000, logit_bias=ENDLESS)
    streams.wait_started()
    sigterm(server)
    streams.join()
    for lines in streams.lines:
        error = json.loads(lines[-1].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down"
        assert "data: [DONE]" not in lines
    assert server.process is not None
    assert server.process.wait(timeout=600) == 0
    for request_id in streams.request_ids:
        (row,) = log_rows(server, "request_id = ?", request_id)
        assert (row["status"], row["http_status"], row["error"]) == (
            "error",
            200,
            "The server is shutting down; try again in a moment.",
        )
    assert wal_bytes(server) == 0


def test_a_second_sigterm_exits_at_once(make_server: object) -> None:
    assert callable(make_server)
    server: Server = make_server("600")
    streams = Streams(server, 1, max_tokens=4000, logit_bias=ENDLESS)
    streams.wait_started()
    assert server.process is not None
    tree = process_tree(server.process.pid)
    sigterm(server)
    wait_until(lambda: "requests in flight have 600 s" in server.log_path.read_text(), "the drain has begun")
    sigterm(server)
    # Well before the 600 s grace: the second signal does not wait for the stream.
    assert server.process.wait(timeout=120) == 1
    for thread in streams.threads:
        thread.join(timeout=120)
    assert streams.lines[0][-1] != "data: [DONE]"
    for pid in tree:
        for _ in range(600):
            if not alive(pid):
                break
            threading.Event().wait(0.1)
        assert not alive(pid), "the worker and its runner are gone too"
    assert "second stop signal" in server.log_path.read_text()
