"""A fine-tuning job that publishes a LoRA adapter: trained, extracted, served beside its base."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests import jobs
from tests.conftest import SMOL, Server
from tests.jobs import LEARNED, follow

pytestmark = pytest.mark.slow

server, client, dataset, uploaded = jobs.server, jobs.client, jobs.dataset, jobs.uploaded  # shared fixtures


@pytest.fixture(scope="module")
def adapter_job(server: Server, client: openai.OpenAI, uploaded: Any) -> Any:
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=SMOL,
        training_file=uploaded.id,
        hyperparameters={"lora_rank": "auto"},  # type: ignore[typeddict-unknown-key]
    )
    follow(server, job.id)
    print(f"\nLoRA job {job.id} in {time.monotonic() - started:.1f} s")
    return client.fine_tuning.jobs.retrieve(job.id)


def test_the_job_publishes_an_adapter_beside_its_base(adapter_job: Any, server: Server, client: openai.OpenAI) -> None:
    assert adapter_job.status == "succeeded", adapter_job.error
    name = adapter_job.fine_tuned_model
    assert name.startswith(f"{SMOL}-ft-")
    assert adapter_job.hyperparameters.model_extra["lora_rank"] == 16
    card = httpx.get(f"{server.url}/v1/locopilot/models/{name}", timeout=30).json()
    assert card["adapter_of"] == SMOL
    assert card["lineage"]["base_model"] == SMOL and card["lineage"]["job_id"] == adapter_job.id
    base_size = (server.models_dir / f"{SMOL}.gguf").stat().st_size
    assert card["size_bytes"] < base_size / 4  # an adapter, not a copy
    answers = []
    for country, city in LEARNED:
        reply = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
            temperature=0,
            max_tokens=16,
        )
        answers.append((city, reply.choices[0].message.content or ""))
    print(f"adapter answers: {answers}")
    assert any(city in answer for city, answer in answers), answers
    engine = httpx.get(f"{server.url}/v1/engine/health", timeout=30).json()["engine"]
    assert engine["loaded_models"] == [SMOL]


def test_a_bad_rank_is_refused(client: openai.OpenAI, uploaded: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(
            model=SMOL,
            training_file=uploaded.id,
            hyperparameters={"lora_rank": 0},  # type: ignore[typeddict-unknown-key]
        )
