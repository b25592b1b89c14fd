"""Training on a remote locopilot: one locopilot (``local``) sends a job to another (``remote``) on loopback.

The remote really runs the job (stopped once its worker has started); refusals from an upstream
that wants a paid plan come back to the client byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import openai
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.models.catalog import ModelCatalog
from locopilot.settings import load_settings
from locopilot.store import jobs as store
from locopilot.store.db import Database
from locopilot.store.jobs import TrainingJob
from locopilot.training.jobs import JobService
from tests.conftest import SMOL, Server
from tests.fakes.fault_upstream import PRO_REQUIRED_BODY, FaultUpstream
from tests.jobs import LONG, wait_for
from tests.test_cli import make_env
from tests.test_training import facts_dataset

pytestmark = pytest.mark.slow
REMOTE_KEY = "remote-admin-key-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("remote"), {SMOL: smollm2_path}, {"LOCOPILOT_ADMIN_KEY": REMOTE_KEY})
    server.start(path="/health")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, remote: Server, fault: FaultUpstream) -> Iterator[Server]:
    upstreams = [
        {"name": "gpu", "url": f"{remote.url}/v1", "locality": "local", "api_key_env": "GPU_KEY"},
        {"name": "pro", "url": fault.url, "locality": "remote"},
    ]
    env = {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams), "GPU_KEY": REMOTE_KEY}
    server = Server(tmp_path_factory.mktemp("local"), {}, env)
    server.start(path="/health")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uploaded(local: Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    dataset = facts_dataset(tmp_path_factory.mktemp("remote-data") / "facts.jsonl")
    with dataset.open("rb") as f:
        return local.client().files.create(file=f, purpose="fine-tune").id


def test_a_remote_job_runs_there_and_is_followed_here(local: Server, remote: Server, uploaded: str) -> None:
    client = local.client()
    job = client.fine_tuning.jobs.create(
        model=SMOL,
        training_file=uploaded,
        hyperparameters=LONG,  # type: ignore[arg-type]
        extra_body={"remote": "gpu"},
    )
    mine = httpx.get(f"{local.url}/v1/locopilot/training/jobs/{job.id}", timeout=10).json()
    assert mine["remote"] == "gpu" and mine["remote_job"]
    theirs = httpx.get(
        f"{remote.url}/v1/locopilot/training/jobs/{mine['remote_job']}",
        headers={"Authorization": f"Bearer {REMOTE_KEY}"},
        timeout=10,
    ).json()
    assert theirs["model"] == SMOL and theirs["dataset_sha256"] == mine["dataset_sha256"]

    def mirrored() -> bool:
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        return any(event.message.startswith("Training ") for event in events)

    wait_for(mirrored, 180, "the remote worker's start, seen here", local)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled", cancelled
    theirs = httpx.get(
        f"{remote.url}/v1/locopilot/training/jobs/{mine['remote_job']}",
        headers={"Authorization": f"Bearer {REMOTE_KEY}"},
        timeout=10,
    ).json()
    assert theirs["status"] == "cancelled"


@pytest.mark.parametrize("mode", ["status_401", "status_403"])
def test_a_remote_refusal_reaches_the_client_unchanged(
    local: Server, fault: FaultUpstream, uploaded: str, mode: str
) -> None:
    fault.mode = mode
    try:
        body = {"model": SMOL, "training_file": uploaded, "remote": "pro"}
        response = httpx.post(f"{local.url}/v1/locopilot/training/jobs", json=body, timeout=30)
    finally:
        fault.mode = "ok"
    assert response.status_code == int(mode[-3:])
    assert response.content == PRO_REQUIRED_BODY
    assert response.json()["error"]["upgrade_url"] == "https://example.invalid/upgrade"
    with pytest.raises(openai.BadRequestError) as info:
        local.client().fine_tuning.jobs.create(model=SMOL, training_file=uploaded, extra_body={"remote": "nowhere"})
    assert info.value.body["param"] == "remote"  # type: ignore[index]


def test_train_remote_from_the_cli(local: Server, remote: Server, fault: FaultUpstream, tmp_path: Path) -> None:
    """`locopilot train --remote NAME`: the dataset goes up to the local server, the job with the
    options given runs on the remote; a refusal there ends the command with its words."""
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    env = make_env(tmp_path)
    runner = CliRunner()
    command = ["train", "--base", SMOL, "--dataset", str(dataset), "--url", local.url, "--no-follow"]
    options = ["--layers", "1", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.001", "--seed", "7"]
    result = runner.invoke(cli, [*command, *options, "--remote", "gpu"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (job_id,) = re.findall(r"ftjob-[0-9a-f]+", result.stdout)
    mine = httpx.get(f"{local.url}/v1/locopilot/training/jobs/{job_id}", timeout=10).json()
    assert mine["remote"] == "gpu"
    theirs = httpx.get(
        f"{remote.url}/v1/locopilot/training/jobs/{mine['remote_job']}",
        headers={"Authorization": f"Bearer {REMOTE_KEY}"},
        timeout=10,
    ).json()
    assert theirs["model"] == SMOL and theirs["seed"] == 7
    assert (
        theirs["hyperparameters"] | {"layers": 1, "epochs": 2, "optimizer": "sgd", "learning_rate": 0.001}
        == (theirs["hyperparameters"])
    )
    cancelled = runner.invoke(cli, ["jobs", "cancel", job_id, "--url", local.url], env=env, catch_exceptions=False)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout, cancelled.output

    fault.mode = "status_403"
    try:
        refused = runner.invoke(cli, [*command, "--remote", "pro"], env=env, catch_exceptions=False)
    finally:
        fault.mode = "ok"
    assert refused.exit_code == 1
    assert "Pro plan required" in refused.stderr and "https://example.invalid/upgrade" in refused.stderr
    assert "HTTP 403" in refused.stderr

    # --server without --remote: the local server has no models of its own, so the job goes to the
    # least-busy upstream locopilot that has the base model (tests/test_fleet_training.py), gpu here.
    placed = runner.invoke(cli, [*command, "--server"], env=env, catch_exceptions=False)
    assert placed.exit_code == 0, placed.output
    (placed_id,) = re.findall(r"ftjob-[0-9a-f]+", placed.stdout)
    assert httpx.get(f"{local.url}/v1/locopilot/training/jobs/{placed_id}", timeout=10).json()["remote"] == "gpu"
    runner.invoke(cli, ["jobs", "cancel", placed_id, "--url", local.url], env=env, catch_exceptions=False)
    # A base model no box has is refused with the server's words.
    missing = runner.invoke(
        cli, ["train", "--base", "nobody-has-this", "--dataset", str(dataset), "--url", local.url, "--server"], env=env
    )
    assert missing.exit_code == 1 and "nobody-has-this" in missing.stderr, missing.output
    # A framework's job on a server trains the base's Hugging Face folder there, which it must name.
    external = runner.invoke(cli, [*command, "--server", "--framework", "mlx"], env=env)
    assert external.exit_code == 2 and "give --hf-base FOLDER" in external.stderr, external.output


@pytest.mark.anyio
async def test_a_mirrored_job_the_remote_does_not_know_fails_here_at_once(tmp_path: Path, fault: FaultUpstream) -> None:
    """The remote answers the job's log stream with 404 (here: a server that has no such job):
    the mirror stops and fails the job, instead of asking again every 5 s until shutdown."""
    upstreams = [{"name": "pro", "url": fault.url, "locality": "remote"}]
    settings = load_settings({"LOCOPILOT_DATA_DIR": str(tmp_path), "LOCOPILOT_UPSTREAMS": json.dumps(upstreams)})
    db = Database.open(settings.db_path)
    job = TrainingJob(
        id="ftjob-mirrored",
        status="queued",
        base_model=SMOL,
        dataset_path=str(tmp_path / "none.jsonl"),
        remote="pro",
        remote_job="ftjob-gone",
        created_at=0.0,
    )
    store.insert(db, job)
    service = JobService(settings, db, ModelCatalog(tmp_path / "models"))
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(service.run)
            with anyio.fail_after(3):
                while (found := store.get(db, job.id)).status == "queued":  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            await service.aclose()  # the service's tasks end: the task group ends
    finally:
        db.close()
    assert found.status == "failed" and found.error_code == "remote_job_not_found"
    assert "remote 'pro'" in (found.error or "")
    logs = [r for r in fault.requests if r.path.endswith("/ftjob-gone/logs")]
    assert len(logs) == 1
