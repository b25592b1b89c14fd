"""Checkpoints, resumption after a killed server, and the eval gate: a real server, the official
``openai`` client, real training of SmolLM2 (one layer, a few steps: a few minutes on 2 cores).

- A job that checkpoints every chunk is running when the server's whole process group is
  killed (SIGKILL); the server started again on the same data folder resumes it from its
  checkpoint, and it succeeds: its model is listed and answers.
- The same job with a threshold no result can meet (a validation loss of at most 0.0001) is
  held back by the eval gate: it fails with ``held_back``, the reason in its error, its model
  not listed; the locopilot job API has the gate's verdict and the measures in its result.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import jobs
from tests.conftest import SMOL, Server
from tests.jobs import JOBS, finished, training_server, upload, wait_for

pytestmark = pytest.mark.slow

dataset = jobs.dataset  # a shared fixture

#: A short job: 2 epochs over about 4 windows, the last block only, a checkpoint after each
#: chunk of 4 windows but the last.
SHORT: dict[str, Any] = {"n_epochs": 2, "layers": 1, "checkpoint_steps": 2}


@pytest.fixture
def server(tmp_path: Path, smollm2_path: Path) -> Iterator[Server]:
    running = training_server(tmp_path, smollm2_path)
    running.new_session = True  # its own process group, killed as a whole below
    yield running.start()
    running.stop()


def messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [event.message for event in client.fine_tuning.jobs.list_events(job_id, limit=100).data]


def test_a_job_resumes_from_its_checkpoint_after_the_server_is_killed(server: Server, dataset: Path) -> None:
    client = server.client()
    job = client.fine_tuning.jobs.create(
        model=SMOL,
        training_file=upload(client, dataset).id,
        hyperparameters=SHORT,  # type: ignore[arg-type]
    )

    def checkpointed() -> bool:
        return any(m.startswith("Checkpoint saved at step") for m in messages(client, job.id))

    wait_for(checkpointed, 600, "the first checkpoint", server)
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)  # the server, its granian worker, the training worker
    server.process.wait()
    killed = time.monotonic()
    server.start()
    client = server.client()
    job = finished(client, job.id, server)
    assert job.status == "succeeded", (job.error, server.log())
    seen = messages(client, job.id)
    assert any(m == "The server restarted; the job resumes from its last checkpoint" for m in seen), seen
    resumed = [m for m in seen if m.startswith("Resumed from the checkpoint at step")]
    assert resumed, seen
    print(f"\n{resumed[0]}; the job succeeded {time.monotonic() - killed:.0f} s after the kill")
    assert job.fine_tuned_model in {model.id for model in client.models.list()}
    reply = client.chat.completions.create(
        model=job.fine_tuned_model or "",
        messages=[{"role": "user", "content": "What is the capital of Zorbania?"}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    # Nothing of the checkpoint is left once the job ended.
    assert not list((server.root / "data" / "training" / "checkpoints").glob(f"{job.id}*"))
    native = httpx.get(f"{server.url}{JOBS}/{job.id}", timeout=30).json()
    assert native["result"]["gate"] == {"thresholds": {}, "passed": True, "reasons": []}
    recall = native["result"]["spot_check"]["recall"]
    assert recall["asked"] >= 1 and len(recall["answers"]) == recall["asked"]


def test_the_eval_gate_holds_back_a_result_under_its_threshold(server: Server, dataset: Path) -> None:
    client = server.client()
    job = client.fine_tuning.jobs.create(
        model=SMOL,
        training_file=upload(client, dataset).id,
        hyperparameters={**SHORT, "checkpoint_steps": 0},  # type: ignore[arg-type]
        metadata={"max_validation_loss": "0.0001"},
    )
    job = finished(client, job.id, server)
    assert job.status == "failed" and job.error is not None, server.log()
    assert job.error.code == "held_back"
    assert "validation loss" in job.error.message and "above max_validation_loss 0.0001" in job.error.message
    assert job.fine_tuned_model is None
    assert not any(model.id.startswith(f"{SMOL}-ft-") for model in client.models.list())
    native = httpx.get(f"{server.url}{JOBS}/{job.id}", timeout=30).json()
    gate = native["result"]["gate"]
    assert gate["passed"] is False and gate["thresholds"] == {"max_validation_loss": 0.0001}
    assert Path(gate["held_path"]).is_file()
    assert native["result"]["validation_loss_after"] > 0.0001
    assert native["hyperparameters"]["max_validation_loss"] == 0.0001
