"""Runner processes under stress: crashes, disconnects, a full queue, unloading."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import GEMMA, SMOL, Server, start_server
from tests.test_api import log_rows

LONG = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
# SmolLM2's end-of-text and end-of-turn tokens: banned, a reply can only end by cancellation or max_tokens.
ENDLESS = {"0": -100.0, "2": -100.0}


def runners(server: Server) -> list[dict[str, object]]:
    engine = server.engine_health()["engine"]
    assert isinstance(engine, dict)
    found: list[dict[str, object]] = engine["runners"]
    return found


def wait_until(condition: object, what: str, attempts: int = 200, pause: float = 0.1) -> None:
    assert callable(condition)
    for _ in range(attempts):
        if condition():
            return
        time.sleep(pause)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    """A server of its own: these tests kill runners and fill queues (one slot, so one request fills it).
    Its threads are the default's (the other test servers set 2)."""
    settings = {"LOCOPILOT_QUEUE_SIZE": "0", "LOCOPILOT_PARALLEL": "1", "LOCOPILOT_THREADS": "0"}
    running = start_server(tmp_path_factory, {SMOL: smollm2_path}, settings)
    yield running
    running.stop()


def test_a_killed_runner_costs_one_request_not_the_server(lone: Server) -> None:
    client = lone.client()
    client.chat.completions.create(model=SMOL, messages=LONG, max_tokens=2)
    (before,) = runners(lone)
    pid = before["pid"]
    assert isinstance(pid, int)
    # Every core for steps of several tokens (as llama.cpp reports them); see the next test for one-token steps.
    assert before["threads_batch"] == (os.cpu_count() or 1)

    errors: list[BaseException] = []

    def long_request() -> None:
        try:
            client.chat.completions.create(
                model=SMOL, messages=LONG, max_tokens=1500, temperature=0, logit_bias=ENDLESS
            )
        except openai.APIError as exc:
            errors.append(exc)

    worker = threading.Thread(target=long_request)
    worker.start()
    wait_until(lambda: runners(lone)[0]["in_flight"] == 1, "the request is running")
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert len(errors) == 1
    error = errors[0]
    assert isinstance(error, openai.InternalServerError)
    assert error.status_code == 503
    assert "exited" in error.message

    reply = client.chat.completions.create(model=SMOL, messages=LONG, max_tokens=3)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3
    (after,) = runners(lone)
    assert after["pid"] != pid
    assert httpx.get(f"{lone.url}/health", timeout=5).status_code == 200
    failed = log_rows(lone, "http_status = 503 AND error LIKE '%exited%'")
    assert len(failed) == 1


def test_one_token_steps_get_the_thread_count_the_runner_measured_faster(lone: Server) -> None:
    """With LOCOPILOT_THREADS unset, a runner times one-token steps with every core and with one
    fewer while it serves one stream, keeps the faster, and engine health says so with the times."""
    cores = os.cpu_count() or 1
    client = lone.client()
    client.chat.completions.create(model=SMOL, messages=LONG, max_tokens=60, temperature=0, logit_bias=ENDLESS)
    (info,) = runners(lone)
    reason = info["threads_reason"]
    assert isinstance(reason, str)
    if cores == 1:
        assert (info["threads"], reason) == (1, "one core")
        return
    assert reason.startswith("measured: "), reason
    assert f"{cores} threads " in reason and f"{cores - 1} threads " in reason, reason
    timed = {int(n): float(ms) for n, ms in re.findall(r"(\d+) threads ([\d.]+) ms/token", reason)}
    assert info["threads"] == min(timed, key=lambda n: timed[n])
    assert info["threads_batch"] == cores


def test_client_disconnect_stops_generation(lone: Server) -> None:
    body = {
        "model": SMOL,
        "messages": LONG,
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "logit_bias": ENDLESS,
    }
    seen = 0
    with httpx.stream("POST", f"{lone.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        before = runners(lone)[0]["tokens_generated"]
        assert isinstance(before, int)
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen == 5:
                break
    wait_until(lambda: runners(lone)[0]["in_flight"] == 0, "the runner is free again")
    wait_until(lambda: log_rows(lone, "request_id = ?", request_id), "the cancelled request is logged")
    (row,) = log_rows(lone, "request_id = ?", request_id)
    assert row["status"] == "cancelled"
    assert row["http_status"] == 200  # what the client got before it left
    after = runners(lone)[0]["tokens_generated"]
    assert isinstance(after, int)
    # The runner stopped within a few tokens of the last one the client read, far short of 1500.
    assert after - before < seen + 20, (before, after, seen)


def test_disconnect_before_the_response_cancels_too(lone: Server) -> None:
    """A non-streaming client that gives up stops generation; nothing has been sent yet."""
    before = runners(lone)[0]["tokens_generated"]
    assert isinstance(before, int)
    body = {"model": SMOL, "messages": LONG, "max_tokens": 1500, "temperature": 0, "logit_bias": ENDLESS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{lone.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=1.5))
    wait_until(lambda: runners(lone)[0]["in_flight"] == 0, "the runner is free again")
    after = runners(lone)[0]["tokens_generated"]
    assert isinstance(after, int)
    assert after - before < 500, (before, after)  # about 1.5 s of generation, far short of 1500
    wait_until(lambda: log_rows(lone, "status = 'cancelled' AND http_status = 499"), "the request is logged")


def test_a_full_queue_answers_503_with_retry_after(lone: Server) -> None:
    body = {"model": SMOL, "messages": LONG, "max_tokens": 1500, "stream": True, "logit_bias": ENDLESS}
    with httpx.stream("POST", f"{lone.url}/v1/chat/completions", json=body, timeout=60) as busy:
        assert busy.status_code == 200
        # Keep the iterator: dropping it closes the response, which cancels the request.
        lines = busy.iter_lines()
        assert next(lines).startswith("data: ")
        refused = httpx.post(
            f"{lone.url}/v1/chat/completions",
            json={"model": SMOL, "messages": LONG, "max_tokens": 2},
            timeout=30,
        )
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    wait_until(lambda: runners(lone)[0]["in_flight"] == 0, "the runner is free again")
    reply = lone.client().chat.completions.create(model=SMOL, messages=LONG, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


def test_idle_models_unload_and_the_oldest_goes_first(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, gemma_path: Path
) -> None:
    server = start_server(
        tmp_path_factory,
        {SMOL: smollm2_path, GEMMA: gemma_path},
        {"LOCOPILOT_MAX_LOADED_MODELS": "1", "LOCOPILOT_MODEL_IDLE_TTL": "2"},
    )
    try:
        client = server.client()
        client.chat.completions.create(model=SMOL, messages=LONG, max_tokens=1)
        assert [r["model"] for r in runners(server)] == [SMOL]
        smol_pid = runners(server)[0]["pid"]
        assert isinstance(smol_pid, int)
        client.chat.completions.create(model=GEMMA, messages=LONG, max_tokens=1)
        assert [r["model"] for r in runners(server)] == [GEMMA]
        wait_until(lambda: not _alive(smol_pid), "the evicted runner's process has exited")
        loaded = {m.id: m.model_dump()["loaded"] for m in client.models.list().data}
        assert loaded == {SMOL: False, GEMMA: True}
        wait_until(lambda: runners(server) == [], "the idle model is unloaded", attempts=100)
        assert not any(m.model_dump()["loaded"] for m in client.models.list().data)
    finally:
        assert server.stop() == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "zombie" not in status.read()
    except FileNotFoundError:
        return False


def test_shutdown_ends_runner_processes(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> None:
    server = start_server(tmp_path_factory, {SMOL: smollm2_path})
    server.client().chat.completions.create(model=SMOL, messages=LONG, max_tokens=1)
    pid = runners(server)[0]["pid"]
    assert isinstance(pid, int)
    assert server.stop() == 0
    wait_until(lambda: not _alive(pid), "the runner has exited with the server")


def test_code_in_the_working_directory_is_never_imported(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    """A `llama_cpp/` package where the server was started must not shadow the real one."""
    workdir = tmp_path_factory.mktemp("workdir")
    marker = workdir / "imported"
    (workdir / "llama_cpp").mkdir()
    (workdir / "llama_cpp" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit('shadowed')\n"
    )
    server = Server(tmp_path_factory.mktemp("server"), {SMOL: smollm2_path}, cwd=workdir).start()
    try:
        reply = server.client().chat.completions.create(model=SMOL, messages=LONG, max_tokens=2)
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 2
    finally:
        server.stop()
    assert not marker.exists()


def test_concurrent_loads_respect_max_loaded_models(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, gemma_path: Path
) -> None:
    server = start_server(
        tmp_path_factory, {SMOL: smollm2_path, GEMMA: gemma_path}, {"LOCOPILOT_MAX_LOADED_MODELS": "1"}
    )
    try:
        client = server.client()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(
                pool.map(
                    lambda model: client.chat.completions.create(model=model, messages=LONG, max_tokens=2),
                    [SMOL, GEMMA],
                )
            )
        assert [r.usage.completion_tokens for r in replies if r.usage] == [2, 2]
        assert len(runners(server)) == 1
        assert len(_runner_processes(server)) == 1
    finally:
        server.stop()


def _runner_processes(server: Server) -> list[int]:
    """Live `_runner` processes descended from the server."""
    assert server.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if b"_runner" in cmdline and "zombie" not in status and _descends_from(int(entry.name), server.process.pid):
            found.append(int(entry.name))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False
