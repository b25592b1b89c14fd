"""A hostile chat template in a base model, met by training (issue 22: same sandbox as serving).

The trainer renders examples with the base model's template. It does so in the same
memory-capped helper process serving uses (locopilot/engine/template_process.py), so a
template that builds gigabytes fails with a clear error: in ``train validate``, and in a
fine-tuning job started through the server with the official client, which fails saying why
while the server goes on.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.engine.templates import TemplateError
from locopilot.training.tokenizer import ChatTokenizer
from tests.conftest import SMOL, Server
from tests.security.conftest import ADMIN_KEY
from tests.security.test_ssti import with_chat_template
from tests.test_cli import make_env

#: Compiles, then builds a 2 GiB string from each message at render time.
GREEDY = "{% for m in messages %}{{ m['content']|center(2 ** 31) }}{% endfor %}"
HOSTILE = "greedy"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    return with_chat_template(smollm2_path, tmp_path_factory.mktemp("greedy") / f"{HOSTILE}.gguf", GREEDY)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": f"Fact {i}?"}, {"role": "assistant", "content": f"Fact {i}."}]}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_the_tokenizer_fails_cleanly_without_the_memory(hostile: Path) -> None:
    before = peak_rss_mib()
    tokenizer = ChatTokenizer(hostile)
    try:
        started = time.monotonic()
        with pytest.raises(TemplateError):
            tokenizer.count([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
        assert time.monotonic() - started < 30
    finally:
        tokenizer.close()
    assert peak_rss_mib() - before < 256  # the 2 GiB string was never built here


def test_train_validate_says_the_template_fails(tmp_path: Path, hostile: Path, dataset: Path) -> None:
    result = CliRunner().invoke(
        cli, ["train", "validate", str(dataset), "--base", str(hostile)], env=make_env(tmp_path)
    )
    assert result.exit_code == 1, result.output
    assert f"the chat template of {hostile} fails" in result.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, hostile: Path) -> Iterator[Server]:
    running = Server(
        tmp_path_factory.mktemp("greedy-server"),
        {SMOL: smollm2_path, HOSTILE: hostile},
        {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY},
    )
    try:
        yield running.start(path="/health")
    finally:
        running.stop()


def test_a_job_on_the_hostile_base_fails_saying_why(server: Server, dataset: Path) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
    server.clients.append(client)
    with dataset.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=HOSTILE, training_file=uploaded.id)
    deadline = time.monotonic() + 300
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "failed", job
    assert job.error is not None
    assert "chat template fails" in (job.error.message or "")
    # The server goes on serving the other model.
    reply = client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None
