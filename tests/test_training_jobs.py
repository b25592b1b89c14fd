"""The training job service end to end: a real server, the official ``openai`` client, real training.

One job really trains SmolLM2 on invented facts with the defaults, every hyperparameter
``auto`` (the ``trained`` fixture, shared by the tests that look at its result); the other
jobs are stopped early (cancel, kill -9 of the worker, kill -9 of the server) once their
worker has reported its first steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from tests import jobs
from tests.conftest import SMOL, Server
from tests.jobs import JOBS, LEARNED, LONG, MAX_FILE_BYTES, follow, training_server, wait_for
from tests.test_cli import make_env

pytestmark = pytest.mark.slow

server, client, dataset, uploaded = jobs.server, jobs.client, jobs.dataset, jobs.uploaded  # shared fixtures


def worker_started(client: openai.OpenAI, server: Server, job_id: str) -> None:
    """Wait until the job's worker is training: it has reported the job's size, before its first step."""

    def training() -> bool:
        events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
        return any(event.message.startswith("Training ") for event in events)

    wait_for(training, 180, f"the worker of {job_id} to start", server)


def descendants(pid: int) -> set[int]:
    """Processes below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def training_workers(pid: int) -> list[int]:
    workers = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_train" in cmdline:
            workers.append(child)
    return workers


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the job that really trains -------------------------------------------------------


class Trained:
    def __init__(self, job: Any, events: list[tuple[str, dict[str, Any]]], seconds: float) -> None:
        self.job = job
        self.events = events
        self.seconds = seconds


@pytest.fixture(scope="module")
def trained(server: Server, client: openai.OpenAI, uploaded: Any) -> Trained:
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id)
    assert job.status == "queued" and job.object == "fine_tuning.job"
    # Chosen when the job starts; until then, OpenAI's "auto".
    assert (job.hyperparameters.n_epochs, job.hyperparameters.learning_rate_multiplier) == ("auto", "auto")
    assert job.hyperparameters.batch_size == 1
    events = follow(server, job.id)
    seconds = time.monotonic() - started
    print(f"\ntrained job {job.id} in {seconds:.1f} s")
    return Trained(client.fine_tuning.jobs.retrieve(job.id), events, seconds)


def test_the_job_succeeds_with_progress_events(trained: Trained, server: Server) -> None:
    job = trained.job
    assert job.status == "succeeded", (job.error, server.log())
    assert re.fullmatch(rf"{SMOL}-ft-[0-9a-f]{{8}}", job.fine_tuned_model or "")
    assert job.trained_tokens and job.trained_tokens > 0
    metrics = [data for name, data in trained.events if name == "metrics"]
    assert metrics, trained.events
    steps = [m["data"]["step"] for m in metrics]
    assert steps == sorted(steps) and steps[-1] == metrics[-1]["data"]["total_steps"]
    for m in metrics:
        assert m["data"]["train_loss"] > 0 and m["data"]["tokens_per_s"] > 0
        assert 0 < m["data"]["progress"] <= 1 and m["data"]["eta_s"] is not None
    assert metrics[-1]["data"]["eta_s"] == 0
    name, end = trained.events[-1]
    assert name == "end" and end["status"] == "succeeded" and end["fine_tuned_model"] == job.fine_tuned_model
    result = end["result"]
    assert result["train_loss_after"] < result["train_loss_before"]
    print(
        f"\njob: {result['trained_tokens']} tokens at {result['tokens_per_s']:.1f} tokens/s, "
        f"loss {result['train_loss_before']:.3f} -> {result['train_loss_after']:.3f}, "
        f"validation {result['validation_loss_before']:.3f} -> {result['validation_loss_after']:.3f}, "
        f"peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, worker {result['seconds']:.0f} s, "
        f"job {trained.seconds:.0f} s"
    )


def test_openai_events_list_newest_first(trained: Trained, client: openai.OpenAI) -> None:
    events = client.fine_tuning.jobs.list_events(trained.job.id, limit=3)
    assert [e.object for e in events.data] == ["fine_tuning.job.event"] * 3
    assert events.data[0].message == "The job has successfully completed"
    assert events.has_more
    everything = list(client.fine_tuning.jobs.list_events(trained.job.id, limit=2))  # the SDK follows the cursor
    assert everything[-1].message.startswith("Created fine-tuning job")
    assert len(everything) == len([e for e in trained.events if e[0] in ("message", "metrics")])
    assert {job.id for job in client.fine_tuning.jobs.list()} >= {trained.job.id}


def test_the_model_is_listed_with_its_lineage(
    trained: Trained, server: Server, uploaded: Any, dataset: Path, smollm2_path: Path
) -> None:
    name = trained.job.fine_tuned_model
    card = httpx.get(f"{server.url}/v1/models/{name}", timeout=30).json()
    lineage = card["lineage"]
    assert lineage["job_id"] == trained.job.id
    assert lineage["base_model"] == SMOL
    assert lineage["base_sha256"] == hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert lineage["dataset_sha256"] == hashlib.sha256(dataset.read_bytes()).hexdigest() == uploaded.sha256
    assert lineage["training_file"] == uploaded.id
    assert lineage["hyperparameters"]["chosen"] == ["epochs", "learning_rate", "layers"]
    assert {k: lineage["hyperparameters"][k] for k in ("epochs", "learning_rate", "layers")} == {
        "epochs": trained.job.hyperparameters.n_epochs,
        "learning_rate": trained.job.hyperparameters.model_extra["learning_rate"],  # type: ignore[index]
        "layers": trained.job.hyperparameters.model_extra["layers"],  # type: ignore[index]
    }
    assert lineage["sha256"] == hashlib.sha256((server.models_dir / f"{name}.gguf").read_bytes()).hexdigest()
    assert card["quantization"] == "Q8_0"
    job = httpx.get(f"{server.url}{JOBS}/{trained.job.id}", timeout=30).json()
    assert job["output_sha256"] == lineage["sha256"] and job["base_sha256"] == lineage["base_sha256"]
    assert not list((server.data_dir / "training" / "jobs").iterdir()), "the work folder is removed"


def test_auto_hyperparameters_are_chosen_and_reported(trained: Trained, smollm2_path: Path) -> None:
    """The job object says what ``auto`` chose: the rule's values for this model and dataset."""
    from locopilot.models.gguf import read_header
    from locopilot.training import auto

    header = read_header(smollm2_path)
    hyper = trained.job.hyperparameters
    started = next(data["data"] for name, data in trained.events if data.get("message", "").startswith("Training "))
    # Counted over the dataset's own windows, the anchors' left out.
    assert hyper.n_epochs == auto.epochs(started["dataset_windows"]) == started["epochs"]
    assert 1 <= started["dataset_windows"] <= started["windows"]
    assert hyper.batch_size == 1 and hyper.learning_rate_multiplier == 1.0
    extra = hyper.model_extra or {}
    assert extra["learning_rate"] == pytest.approx(auto.learning_rate(header))
    assert extra["layers"] == auto.layers(header) == started["trained_layers"]
    assert trained.job.method.supervised.hyperparameters.n_epochs == hyper.n_epochs  # type: ignore[union-attr]


def test_the_model_answers_a_trained_fact(trained: Trained, client: openai.OpenAI) -> None:
    """With the defaults alone (the issue's user recalled nothing with the old ones)."""
    answers = []
    for country, city in LEARNED:
        reply = client.chat.completions.create(
            model=trained.job.fine_tuned_model or "",
            messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
            temperature=0,
            max_tokens=16,
        )
        answers.append((city, reply.choices[0].message.content or ""))
    assert any(city in answer for city, answer in answers), answers


def test_jobs_cli(trained: Trained, server: Server, dataset: Path, tmp_path: Path) -> None:
    env = make_env(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(cli, ["jobs", "list", "--url", server.url], env=env, catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    assert trained.job.id in listed.stdout and "succeeded" in listed.stdout
    shown = runner.invoke(cli, ["jobs", "show", trained.job.id, "--url", server.url], env=env, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert trained.job.fine_tuned_model in shown.stdout and "tokens/s" in shown.stdout
    logs = runner.invoke(cli, ["jobs", "logs", trained.job.id, "--url", server.url], env=env, catch_exceptions=False)
    assert logs.exit_code == 0, logs.output
    assert "step " in logs.stdout and "succeeded" in logs.stdout
    missing = runner.invoke(cli, ["jobs", "show", "ftjob-nope", "--url", server.url], env=env)
    assert missing.exit_code == 1 and "No training job" in missing.stderr
    submit = ["jobs", "submit", str(dataset), "--base", SMOL, "--layers", "1", "--no-follow", "--url", server.url]
    submitted = runner.invoke(cli, submit, env=env, catch_exceptions=False)
    assert submitted.exit_code == 0, submitted.output
    (job_id,) = re.findall(r"ftjob-[0-9a-f]+", submitted.stdout)
    cancelled = runner.invoke(cli, ["jobs", "cancel", job_id, "--url", server.url], env=env, catch_exceptions=False)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout, cancelled.output


# -- refusals, before any work --------------------------------------------------------


def test_a_bad_dataset_is_refused_naming_the_line(client: openai.OpenAI, dataset: Path, tmp_path: Path) -> None:
    lines = dataset.read_text().splitlines()
    lines[2] = lines[2].replace('"role": "assistant"', '"role": "robot"')
    lines[4] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(openai.BadRequestError) as info, bad.open("rb") as f:
        client.files.create(file=f, purpose="fine-tune")
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_file" and error["param"] == "file"
    assert "line 3: messages[1]: role 'robot'" in error["message"]
    assert "line 5: not valid JSON" in error["message"]
    assert all(f.filename != "bad.jsonl" for f in client.files.list())


def test_upload_limits(server: Server, client: openai.OpenAI, dataset: Path) -> None:
    with pytest.raises(openai.BadRequestError) as info, dataset.open("rb") as f:
        client.files.create(file=f, purpose="batch")
    assert info.value.body["param"] == "purpose"  # type: ignore[index]
    big = b"x" * (MAX_FILE_BYTES + 1)
    response = httpx.post(f"{server.url}/v1/files", data={"purpose": "fine-tune"}, files={"file": ("big.jsonl", big)})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"
    response = httpx.post(f"{server.url}/v1/files", json={"purpose": "fine-tune"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]
    assert not [p for p in (server.data_dir / "files").iterdir() if p.name.startswith(".")], "no partial file is left"


def test_a_file_can_be_deleted(client: openai.OpenAI, dataset: Path, server: Server) -> None:
    with dataset.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    stored = server.data_dir / "files" / f"{uploaded.id}.jsonl"
    assert stored.read_bytes() == dataset.read_bytes()
    assert client.files.delete(uploaded.id).deleted
    assert not stored.exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_job_requests_are_checked(client: openai.OpenAI, uploaded: Any) -> None:
    with pytest.raises(openai.NotFoundError) as missing_model:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=uploaded.id)
    assert missing_model.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing_file:
        client.fine_tuning.jobs.create(model=SMOL, training_file="file-nope")
    assert missing_file.value.body["param"] == "training_file"  # type: ignore[index]
    refused: list[dict[str, Any]] = [
        {"hyperparameters": {"n_epochs": 0}},
        {"hyperparameters": {"batch_size": 8}},
        {"hyperparameters": {"context": 300}},
        {"hyperparameters": {"learning_rate_multiplier": 5000}},
        {"hyperparameters": {"learning_rate_multiplier": "high"}},
        {"hyperparameters": {"n_epochs": "many"}},
        {"hyperparameters": {"layers": -1}},
        {"suffix": "mine"},
        {"method": {"type": "dpo"}},
    ]
    for extra in refused:
        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id, **extra)
        assert info.value.body["type"] == "invalid_request_error", extra  # type: ignore[index]
        if "hyperparameters" in extra:
            assert str(info.value.body["param"]).startswith("hyperparameters"), info.value.body  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


# -- stopping jobs ------------------------------------------------------------------


def test_cancel_a_queued_and_a_running_job(server: Server, client: openai.OpenAI, uploaded: Any) -> None:
    running = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id, hyperparameters=LONG)  # type: ignore[arg-type]
    waiting = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id, hyperparameters=LONG)  # type: ignore[arg-type]
    assert client.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"  # concurrency 1: it was queued
    worker_started(client, server, running.id)
    assert client.fine_tuning.jobs.retrieve(running.id).status == "running"
    assert training_workers(server.process.pid)  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as in_use:
        client.files.delete(uploaded.id)
    assert in_use.value.body["code"] == "file_in_use"  # type: ignore[index]
    started = time.monotonic()
    cancelled = client.fine_tuning.jobs.cancel(running.id)
    print(f"\ncancel took {time.monotonic() - started:.1f} s")
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    wait_for(lambda: not training_workers(server.process.pid), 10, "the worker to exit", server)  # type: ignore[union-attr]
    assert not list(server.models_dir.glob(f"*{running.id.removeprefix('ftjob-')[:8]}*"))
    assert client.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"  # again: unchanged


def test_a_killed_worker_fails_its_job_and_the_next_runs(server: Server, client: openai.OpenAI, uploaded: Any) -> None:
    doomed = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id, hyperparameters=LONG)  # type: ignore[arg-type]
    following = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id, hyperparameters=LONG)  # type: ignore[arg-type]
    worker_started(client, server, doomed.id)
    (worker,) = training_workers(server.process.pid)  # type: ignore[union-attr]
    os.kill(worker, signal.SIGKILL)
    failed = wait_for(
        lambda: (job := client.fine_tuning.jobs.retrieve(doomed.id)).status == "failed" and job,
        30,
        "the job to fail",
        server,
    )
    assert failed.error is not None and failed.error.code == "worker_died"
    assert f"status {-signal.SIGKILL}" in failed.error.message
    worker_started(client, server, following.id)
    assert client.fine_tuning.jobs.cancel(following.id).status == "cancelled"


@pytest.mark.parametrize("ending", ["kill -9", "SIGTERM"])
def test_a_server_ended_leaves_no_job_running_and_no_worker(
    tmp_path: Path, smollm2_path: Path, dataset: Path, ending: str
) -> None:
    server = training_server(tmp_path, smollm2_path).start()
    try:
        client = server.client()
        with dataset.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="fine-tune")
        interrupted = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id, hyperparameters=LONG)  # type: ignore[arg-type]
        queued = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id, hyperparameters=LONG)  # type: ignore[arg-type]
        worker_started(client, server, interrupted.id)
        assert server.process is not None
        workers = training_workers(server.process.pid)
        assert len(workers) == 1
        started = time.monotonic()
        if ending == "SIGTERM":  # the job service ends the worker's input and waits for it
            assert server.stop() == 0
            assert not alive(workers[0])
            print(f"\nthe server stopped {time.monotonic() - started:.1f} s after SIGTERM with a job training")
        else:
            # The whole server, main process and its granian worker, but not the training worker.
            for pid in descendants(server.process.pid) - set(workers) | {server.process.pid}:
                with contextlib.suppress(OSError):
                    if b"python" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
            server.process.wait()
            started = time.monotonic()
            wait_for(lambda: not alive(workers[0]), 10, "the orphaned worker to exit", server)
            print(f"\nthe orphaned worker exited {time.monotonic() - started:.1f} s after the server was killed")
        server.start()
        client = server.client()
        job = client.fine_tuning.jobs.retrieve(interrupted.id)
        assert job.status == "failed" and job.error is not None and job.error.code == "interrupted"
        # The queued job never started: it runs now.
        worker_started(client, server, queued.id)
        assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    finally:
        server.stop()
    assert not training_workers(os.getpid())
