"""A fleet of locopilots: a job that names no box goes to the least-busy box that has its base model.

A front with no models of its own has two real locopilot boxes as upstreams. ``box1`` is kept busy
with a long job of its own; both have SmolLM2, only ``box1`` has it under a second name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import SMOL, Server
from tests.jobs import LONG
from tests.test_training import facts_dataset

pytestmark = pytest.mark.slow
KEY = "fleet-box-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ONLY_ON_BOX1 = "smol-copy"
NATIVE_LONG = {"epochs": LONG["n_epochs"], "layers": LONG["layers"], "context": LONG["context"]}


@pytest.fixture(scope="module")
def boxes(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[list[Server]]:
    env = {"LOCOPILOT_ADMIN_KEY": KEY}
    first = Server(tmp_path_factory.mktemp("box1"), {SMOL: smollm2_path, ONLY_ON_BOX1: smollm2_path}, env)
    second = Server(tmp_path_factory.mktemp("box2"), {SMOL: smollm2_path}, env)
    started = [first.start(path="/health"), second.start(path="/health")]
    yield started
    for box in started:
        box.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, boxes: list[Server]) -> Iterator[Server]:
    # "far" is box2 again, as a remote upstream listed first: it would win every tie if a dataset
    # could go to a remote upstream that the request did not name.
    far = {"name": "far", "url": f"{boxes[1].url}/v1", "locality": "remote", "api_key_env": "BOX_KEY"}
    upstreams = [far] + [
        {"name": f"box{i + 1}", "url": f"{box.url}/v1", "locality": "local", "api_key_env": "BOX_KEY"}
        for i, box in enumerate(boxes)
    ]
    env = {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams), "BOX_KEY": KEY}
    server = Server(tmp_path_factory.mktemp("front"), {}, env).start(path="/health")
    yield server
    server.stop()


def upload(server: Server, tmp_path: Path, headers: dict[str, str] | None = None) -> str:
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    with dataset.open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def placed_on(front: Server, job_id: str) -> str | None:
    job = httpx.get(f"{front.url}/v1/locopilot/training/jobs/{job_id}", timeout=10).json()
    remote: str | None = job["remote"]
    return remote


def test_a_job_goes_to_the_least_busy_box_that_has_its_model(
    front: Server, boxes: list[Server], tmp_path: Path
) -> None:
    box1, _ = boxes
    # box1 is busy: a long job of its own, queued there directly.
    busy = httpx.post(
        f"{box1.url}/v1/locopilot/training/jobs",
        json={"model": SMOL, "training_file": upload(box1, tmp_path), **NATIVE_LONG},
        headers=AUTH,
        timeout=30,
    ).json()
    assert busy["status"] in ("queued", "running"), busy
    uploaded = upload(front, tmp_path)
    client = front.client()
    jobs = []
    try:
        # Both boxes have SmolLM2: the idle one gets it.
        jobs.append(client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded, hyperparameters=LONG))  # type: ignore[arg-type]
        assert placed_on(front, jobs[-1].id) == "box2"
        # box2 is now as busy as box1: a tie goes to the first listed.
        native = httpx.post(
            f"{front.url}/v1/locopilot/training/jobs",
            json={"model": SMOL, "training_file": uploaded, **NATIVE_LONG},
            timeout=30,
        ).json()
        jobs.append(client.fine_tuning.jobs.retrieve(native["id"]))
        assert native["remote"] == "box1"
        # Only box1 has this one, busy or not.
        jobs.append(client.fine_tuning.jobs.create(model=ONLY_ON_BOX1, training_file=uploaded, hyperparameters=LONG))  # type: ignore[arg-type]
        assert placed_on(front, jobs[-1].id) == "box1"
        # A named box is kept.
        jobs.append(
            client.fine_tuning.jobs.create(
                model=SMOL,
                training_file=uploaded,
                hyperparameters=LONG,  # type: ignore[arg-type]
                extra_body={"remote": "box2"},
            )
        )
        assert placed_on(front, jobs[-1].id) == "box2"
    finally:
        for job in jobs:
            client.fine_tuning.jobs.cancel(job.id)
        httpx.post(f"{box1.url}/v1/locopilot/training/jobs/{busy['id']}/cancel", headers=AUTH, timeout=30)


def test_a_model_no_box_has_is_refused_as_before(front: Server, tmp_path: Path) -> None:
    uploaded = upload(front, tmp_path)
    with pytest.raises(openai.NotFoundError) as missing:
        front.client().fine_tuning.jobs.create(model="nobody-has-this", training_file=uploaded)
    assert missing.value.body["param"] == "model"  # type: ignore[index]
