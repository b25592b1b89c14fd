"""A fine-tuning dataset built from the request log (``POST /v1/locopilot/datasets/from-logs``).

A keyed server that logs prompts serves SmolLM2 (embedded) and a scripted OpenAI-compatible
upstream (``cloud``): chats go to both through the official client, then an admin turns the
cloud's answers into a dataset (distilling a remote model into a local one) and starts a
fine-tuning job on it with the same client.
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
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import ADMIN, ADMIN_KEY, Key, cloud_server, create_key
from tests.test_api import log_rows

ROUTE = "/v1/locopilot/datasets/from-logs"
SYSTEM = "You answer in one short sentence."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, upstream: FaultUpstream) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("traffic")
    with cloud_server(root, {SMOL: smollm2_path}, upstream, LOCOPILOT_LOG_PROMPTS="true") as running:
        yield running


@pytest.fixture(scope="module")
def alice(server: Server) -> Key:
    return create_key(server, name="alice", scopes=["inference"])


@pytest.fixture(scope="module")
def traffic(server: Server, alice: Key, upstream: FaultUpstream) -> dict[str, Any]:
    """Requests of every kind, once, and the time before them."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=alice.secret, max_retries=0, timeout=120)
    server.clients.append(client)
    started = time.time()
    # Ten at least: the dataset is validated as an upload is.
    questions = ["What is the capital of France?", "Name a primary colour.", *(f"Count to {n}." for n in range(3, 11))]
    for question in questions:
        client.chat.completions.create(
            model=upstream.MODELS[0],
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        )
    stream = client.chat.completions.create(
        model=upstream.MODELS[1], messages=[{"role": "user", "content": "Stream a word."}], stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
    client.completions.create(model=SMOL, prompt="Once upon a time", max_tokens=4)
    deadline = time.time() + 10
    while len(log_rows(server, "created_at >= ?", started)) < len(questions) + 3 and time.time() < deadline:
        time.sleep(0.05)
    return {"started": started, "questions": questions, "streamed": streamed}


def build(server: Server, body: dict[str, Any], headers: dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.post(f"{server.url}{ROUTE}", json=body, headers=headers, timeout=30)


def dataset_lines(server: Server, file_id: str) -> list[dict[str, Any]]:
    path = server.data_dir / "files" / f"{file_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_clouds_answers_become_a_dataset_that_a_job_takes(server: Server, traffic: dict[str, Any]) -> None:
    response = build(server, {"provider": "cloud", "since": traffic["started"], "filename": "distil.jsonl"})
    assert response.status_code == 200, response.text
    body = response.json()
    rows = log_rows(server, "provider = 'cloud' AND created_at >= ? ORDER BY created_at, id", traffic["started"])
    assert body["log_ids"] == [row["id"] for row in rows]
    assert body["skipped"] == {}
    assert body["file"]["examples"] == len(traffic["questions"]) + 1
    assert body["file"]["purpose"] == "fine-tune"
    assert body["file"]["filename"] == "distil.jsonl"

    lines = dataset_lines(server, body["file"]["id"])
    assert [line["metadata"]["log_id"] for line in lines] == body["log_ids"]
    assert [line["metadata"]["request_id"] for line in lines] == [row["request_id"] for row in rows]
    first = lines[0]["messages"]
    assert first[:2] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": traffic["questions"][0]}]
    assert first[2] == {"role": "assistant", "content": rows[0]["completion"]}
    assert first[2]["content"].strip()
    # A streamed reply is logged whole, as it was sent.
    assert lines[-1]["messages"][-1] == {"role": "assistant", "content": traffic["streamed"]}

    admin = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
    server.clients.append(admin)
    assert admin.files.retrieve(body["file"]["id"]).filename == "distil.jsonl"
    job = admin.fine_tuning.jobs.create(model=SMOL, training_file=body["file"]["id"])
    assert job.training_file == body["file"]["id"]
    admin.fine_tuning.jobs.cancel(job.id)


def test_rows_that_are_no_chat_example_are_counted_not_kept(server: Server, traffic: dict[str, Any]) -> None:
    response = build(server, {"since": traffic["started"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file"]["examples"] == len(traffic["questions"]) + 2  # and SmolLM2's chat
    assert body["skipped"] == {"not_messages": 1}  # the /v1/completions prompt
    said_hi = [line for line in dataset_lines(server, body["file"]["id"]) if line["metadata"]["model"] == SMOL]
    assert [line["messages"][0] for line in said_hi] == [{"role": "user", "content": "Say hi."}]


def test_the_dataset_is_validated_as_an_upload_is(server: Server, traffic: dict[str, Any]) -> None:
    response = build(server, {"model": SMOL, "since": traffic["started"]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_file"
    assert "at least 10 are needed" in error["message"]
    assert not [p for p in (server.data_dir / "files").glob("*.jsonl") if p.stat().st_size < 1000]


def test_filters_narrow_and_an_empty_choice_is_a_clear_400(server: Server, alice: Key, traffic: dict[str, Any]) -> None:
    limit = len(traffic["questions"]) + 1
    by_key = build(server, {"key_id": alice.id, "since": traffic["started"], "limit": limit})
    assert by_key.status_code == 200, by_key.text
    oldest = log_rows(server, "key_id = ? AND created_at >= ? ORDER BY created_at, id", alice.id, traffic["started"])
    assert len(oldest) > limit
    assert by_key.json()["log_ids"] == [row["id"] for row in oldest[:limit]]
    for body in ({"since": time.time() + 3600}, {"model": "no-such-model"}, {"key_id": "key-nobody"}):
        response = build(server, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "no_examples"
        assert "No logged request matches" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [({"limit": 0}, "limit"), ({"status": "maybe"}, "status"), ({"provider": "cloud", "extra": 1}, "extra")],
)
def test_a_bad_body_is_refused_in_openais_shape(server: Server, body: dict[str, Any], param: str) -> None:
    response = build(server, body)
    assert response.status_code == 400, response.text
    assert param in response.json()["error"]["message"]


def test_only_an_admin_may_read_the_log(server: Server, alice: Key, traffic: dict[str, Any]) -> None:
    response = build(server, {"since": traffic["started"]}, headers={"Authorization": f"Bearer {alice.secret}"})
    assert response.status_code == 403, response.text


def test_without_logged_prompts_there_is_nothing_to_build_from(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, upstream: FaultUpstream
) -> None:
    with cloud_server(tmp_path_factory.mktemp("no-prompts"), {SMOL: smollm2_path}, upstream) as quiet:
        chat = httpx.post(
            f"{quiet.url}/v1/chat/completions",
            json={"model": upstream.MODELS[0], "messages": [{"role": "user", "content": "Hi"}]},
            headers=ADMIN,
            timeout=30,
        )
        assert chat.status_code == 200, chat.text
        response = build(quiet, {})
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "log_prompts_off"
        assert "LOCOPILOT_LOG_PROMPTS" in error["message"]
        assert not list((quiet.data_dir / "files").glob("*.jsonl"))
