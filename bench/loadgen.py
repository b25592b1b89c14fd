"""The load generator and the process measurements of bench/gateway.py.

``run_cell`` drives one target with N concurrent clients, each on one HTTP/1.1
keep-alive connection over raw asyncio sockets (no HTTP library, so the client
costs as little as it can), and measures the latency of each whole response,
the target's CPU time (its process tree, from /proc) and this process's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_WARMUP = 60.0
"""Seconds a cell waits, past --warmup, for every client's first answer (a slow gateway at 64 clients)."""
STRETCH, MAX_WINDOW = 3.0, 30.0
"""The measured window lasts at least STRETCH times the wait for every client's first answer, up to MAX_WINDOW s."""


class ResponseError(Exception):
    """A response that was not a complete 200 answer."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, one request at a time.

    ``request`` sends the bytes and resolves to ``(status, body)`` once the whole
    response is in (Content-Length or chunked; chunked bodies are de-chunked).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.body_at = -1
        self.length: int | None = None
        self.chunked = False
        self.chunk_at = 0
        self.parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ResponseError(f"connection closed: {exc or 'by the server'}"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        if self.transport is None:
            raise ResponseError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            answer = self._parse()
        except (ValueError, IndexError) as exc:
            self.waiter.set_exception(ResponseError(f"unparsable response: {exc}"))
            return
        if answer is not None:
            self.waiter.set_result(answer)

    def _parse(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        if self.body_at < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            lines = bytes(buffer[:end]).split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
            self.body_at = self.chunk_at = end + 4
            if self.length is None and not self.chunked:
                raise ValueError("neither Content-Length nor chunked")
        if self.length is not None:
            end = self.body_at + self.length
            if len(buffer) < end:
                return None
            return self._done(bytes(buffer[self.body_at : end]), end)
        while True:
            line_end = buffer.find(b"\r\n", self.chunk_at)
            if line_end < 0:
                return None
            size = int(bytes(buffer[self.chunk_at : line_end]).split(b";", 1)[0], 16)
            if size == 0:
                if len(buffer) < line_end + 4:
                    return None
                return self._done(b"".join(self.parts), line_end + 4)
            if len(buffer) < line_end + 2 + size + 2:
                return None
            self.parts.append(bytes(buffer[line_end + 2 : line_end + 2 + size]))
            self.chunk_at = line_end + 2 + size + 2

    def _done(self, body: bytes, end: int) -> tuple[int, bytes]:
        status = self.status
        del self.buffer[:end]
        self._reset()
        return status, body


@dataclass
class Cell:
    """What one (target, mode, clients) run measured."""

    latencies: list[float] = field(default_factory=list)  # seconds, requests that finished in the window
    window: float = 0.0
    errors: int = 0
    first_error: str = ""
    server_cpu: float = 0.0  # seconds of CPU the target's process tree used in the window
    client_cpu: float = 0.0  # seconds of CPU this process used in the window
    peak_rss_kib: int = 0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.window if self.window else 0.0

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Window:
    """The measured window, set once every client has finished a request (``start``/``end`` are perf_counter)."""

    clients: int
    start: float = float("inf")
    end: float = float("inf")
    warm: asyncio.Event = field(default_factory=asyncio.Event)
    warm_clients: int = 0


async def one_client(port: int, data: bytes, stream: bool, window: Window, cell: Cell) -> None:
    loop = asyncio.get_running_loop()
    connection: Connection | None = None
    clock = time.perf_counter
    warm = False
    while True:
        began = clock()
        if began >= window.end:
            break
        try:
            if connection is None or connection.transport is None:
                _, connection = await loop.create_connection(Connection, "127.0.0.1", port)
            status, body = await connection.request(data)
            if status != 200:
                raise ResponseError(f"HTTP {status}: {body[:200]!r}")
            if stream and b"data: [DONE]" not in body:
                raise ResponseError(f"stream without [DONE]: {body[-200:]!r}")
            if not stream and b'"choices"' not in body:
                raise ResponseError(f"no choices: {body[:200]!r}")
        except (OSError, ResponseError) as exc:
            if connection is not None and connection.transport is not None:
                connection.transport.close()
            connection = None
            if clock() >= window.start:
                cell.errors += 1
                cell.first_error = cell.first_error or str(exc)
            await asyncio.sleep(0.01)
            continue
        finished = clock()
        if window.start <= finished <= window.end:
            cell.latencies.append(finished - began)
        if not warm:
            warm = True
            window.warm_clients += 1
            if window.warm_clients == window.clients:
                window.warm.set()
    if connection is not None and connection.transport is not None:
        connection.transport.close()


async def run_cell(
    port: int, path: str, body: bytes, *, stream: bool, clients: int, warmup: float, duration: float, pid: int
) -> Cell:
    """POST ``body`` (JSON) to ``path`` from ``clients`` clients; ``pid`` is the target's process.

    Warms up until every client has had an answer (and ``warmup`` s at least),
    then measures for ``duration`` seconds, or three times as long as the
    warm-up took when that is longer (a slow target at high concurrency). A
    streamed answer must end with ``data: [DONE]``, a JSON one hold ``"choices"``.
    """
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: {'text/event-stream' if stream else 'application/json'}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    data = head.encode() + body
    cell, window = Cell(), Window(clients)
    began = time.perf_counter()
    tasks = [asyncio.create_task(one_client(port, data, stream, window, cell)) for _ in range(clients)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(window.warm.wait(), MAX_WARMUP)
    # A target that serves its clients in lockstep finishes them in waves one latency
    # apart; a window shorter than a few latencies could fall between two waves.
    duration = max(duration, min(STRETCH * (time.perf_counter() - began), MAX_WINDOW))
    await asyncio.sleep(max(0.0, began + warmup - time.perf_counter()))
    server_before, client_before = tree_cpu(pid), time.process_time()
    window.start = time.perf_counter()
    window.end = window.start + duration
    await asyncio.sleep(duration)
    server_after, client_after = tree_cpu(pid), time.process_time()
    cell.window = time.perf_counter() - window.start
    await asyncio.gather(*tasks)
    cell.server_cpu = server_after - server_before
    cell.client_cpu = client_after - client_before
    cell.peak_rss_kib = tree_hwm_kib(pid)
    return cell


# --- process trees --------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of the live processes in ``pid``'s tree."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def tree_hwm_kib(pid: int, key: str = "VmHWM") -> int:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def settle(pid: int, limit: float = 30.0) -> None:
    """Wait until ``pid``'s tree is idle (under 5 % of a CPU), so one cell's backlog does not slow the next."""
    deadline = time.monotonic() + limit
    before = tree_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(0.4)
        after = tree_cpu(pid)
        if after - before < 0.02:
            return
        before = after
