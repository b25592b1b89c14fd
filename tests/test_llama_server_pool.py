"""Two real llama.cpp ``llama-server`` processes on loopback as one pool behind a locopilot front.

Opt-in (``LOCOPILOT_TEST_LLAMA_SERVER_POOL=1``): it needs the ``llama-server`` that
``bench/llama_server.py`` builds (many minutes, once), and two servers under load are heavy for a
shared machine. The front spreads requests over both; when one is killed mid-load (SIGKILL), no
request that had not started streaming fails: the front fails over before the first byte. Requests
that were streaming from the killed server end with an error, as they must.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import SMOL, Server, free_port

BINARY = Path(tempfile.gettempdir()) / "locopilot-bench" / "llama-server-0.3.36" / "llama-server"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LOCOPILOT_TEST_LLAMA_SERVER_POOL") != "1" or not BINARY.is_file(),
        reason="opt-in: LOCOPILOT_TEST_LLAMA_SERVER_POOL=1 and the llama-server bench/llama_server.py builds",
    ),
]
PROMPT = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


class LlamaServer:
    """``llama-server`` serving SmolLM2 as SMOL on a free loopback port, in its own process group."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(BINARY), "-m", str(model), "-a", SMOL, "--host", "127.0.0.1", "--port", str(self.port),
            "-c", "2048", "-np", "2", "-t", "1", "-tb", "1",
        ]  # fmt: skip
        with log.open("wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"llama-server did not become ready:\n{log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def pool(tmp_path: Path, smollm2_path: Path) -> Iterator[tuple[Server, list[LlamaServer]]]:
    servers = [LlamaServer(smollm2_path, tmp_path / f"llama{i}.log") for i in range(2)]
    upstreams = [
        {"name": f"llama{i}", "url": f"{s.url}/v1", "locality": "local", "priority": 10} for i, s in enumerate(servers)
    ]
    front = Server(tmp_path / "front", {}, {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams)}).start(path="/health")
    yield front, servers
    front.stop()
    for server in servers:
        server.kill()


@dataclass
class Outcome:
    replica: str
    streamed: bool
    error: str = ""


def one(client: openai.OpenAI) -> Outcome:
    replica, streamed = "-", False
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=SMOL,
            messages=PROMPT,  # type: ignore[arg-type]
            max_tokens=24,
            stream=True,
        )
        replica = raw.headers.get("x-locopilot-provider", "-")
        for chunk in raw.parse():
            if any(c.delta.content for c in chunk.choices):
                streamed = True
    except openai.APIError as exc:
        return Outcome(replica, streamed, f"{type(exc).__name__}: {exc}")
    return Outcome(replica, streamed)


def run_load(front: Server, requests: int, clients: int, after: int, on_after: threading.Event) -> list[Outcome]:
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    numbers = iter(range(requests))

    def worker() -> None:
        client = front.client()
        while True:
            with lock:
                if next(numbers, None) is None:
                    return
            outcome = one(client)
            with lock:
                outcomes.append(outcome)
                if len(outcomes) >= after:
                    on_after.set()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_the_pool_spreads_and_survives_a_killed_replica(pool: tuple[Server, list[LlamaServer]]) -> None:
    front, servers = pool
    spread = run_load(front, 8, 2, 8, threading.Event())
    assert all(not o.error for o in spread), spread
    assert set(Counter(o.replica for o in spread)) == {"llama0", "llama1"}  # both take traffic

    killed = threading.Event()

    def killer() -> None:
        killed.wait()
        servers[1].kill()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcomes = run_load(front, 16, 4, 4, killed)
    thread.join(timeout=5)
    assert servers[1].process.poll() is not None  # it was killed during the load
    failed_before_stream = [o for o in outcomes if o.error and not o.streamed]
    assert failed_before_stream == [], failed_before_stream
    assert sum(1 for o in outcomes if not o.error) >= 12
    # Once it was gone, every request is served by the other.
    after = run_load(front, 4, 2, 4, threading.Event())
    assert [o.replica for o in after] == ["llama0"] * 4 and all(not o.error for o in after)
