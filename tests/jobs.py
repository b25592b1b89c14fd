"""Fine-tuning jobs through a real server: the training server, the fixtures the job tests share, and the
helpers that wait on a job.

A test module takes the fixtures by importing them (``from tests.jobs import client, dataset, server,
uploaded``); each module that does gets its own module-scoped server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import SMOL, Server
from tests.test_training import FACTS, facts_dataset

JOBS = "/v1/locopilot/training/jobs"
#: Two invented capitals, each asked six ways: 12 examples, 3 training windows of 256 tokens.
LEARNED = FACTS[:2]
#: A job that would run for minutes: stopped early by the tests that use it.
LONG = {"n_epochs": 50, "layers": 1, "context": 256}
MAX_FILE_BYTES = 64 * 1024
FINAL = ("succeeded", "failed", "cancelled")


def training_server(root: Path, smollm2_path: Path, **env: str) -> Server:
    """A server of SmolLM2 with a small upload limit and a short shutdown grace; not started."""
    return Server(
        root,
        {SMOL: smollm2_path},
        {"LOCOPILOT_MAX_FILE_BYTES": str(MAX_FILE_BYTES), "LOCOPILOT_SHUTDOWN_GRACE": "2", **env},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    running = training_server(tmp_path_factory.mktemp("jobs"), smollm2_path).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples of the :data:`LEARNED` facts."""
    folder = tmp_path_factory.mktemp("dataset")
    lines = facts_dataset(folder / "all.jsonl").read_text().splitlines(keepends=True)
    path = folder / "facts.jsonl"
    path.write_text("".join(line for line in lines if any(country in line for country, _ in LEARNED)))
    return path


def upload(client: openai.OpenAI, dataset: Path) -> Any:
    with dataset.open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


@pytest.fixture(scope="module")
def uploaded(client: openai.OpenAI, dataset: Path) -> Any:
    return upload(client, dataset)


def follow(server: Server, job_id: str, timeout: float = 600) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the job's log stream, to its end."""
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{server.url}{JOBS}/{job_id}/logs", timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def wait_for(predicate: Any, timeout: float, what: str, server: Server) -> Any:
    """``predicate()``'s first true value, asked every 0.3 s; fails with the server's log after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{server.log()}")


def finished(client: openai.OpenAI, job_id: str, server: Server, timeout: float = 900) -> Any:
    """The job once it has ended, whichever way."""

    def done() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in FINAL else None

    return wait_for(done, timeout, f"job {job_id} to end", server)
