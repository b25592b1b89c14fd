"""Server jobs that an external framework trains (``framework`` and ``hf_base`` on a job), through the
real server with the OpenAI SDK.

- Refused before anything runs, with OpenAI's error body: no framework Python on the server, the
  framework not installed there, a bad Hugging Face folder, the built-in trainer's options.
- Run as a job against the stand-in Python (tests/frameworks/standin.py): a failing framework fails
  the job with its exit status and log tail, the steps it reports become metrics events; a cancel,
  or the server's stop, ends the framework's whole process group; `locopilot train --server`,
  `--remote` and `locopilot jobs submit` send such a job.
- Slow, where `just framework-envs` made MLX-LM's environment: a real MLX-LM job on a tiny Llama
  whose adapter is converted, served beside the tiny Llama's GGUF, and answers what it learned.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.training import lora, peft
from tests import jobs
from tests import test_training_adapters as adapter_tests
from tests.conftest import SMOL, Server
from tests.frameworks.tiny_gguf import write_gguf
from tests.jobs import JOBS, finished, follow, training_server, upload, wait_for
from tests.security.conftest import ADMIN_KEY, create_key
from tests.test_cli import make_env
from tests.test_lora import peft_folder, random_pairs
from tests.test_training import QUESTIONS
from tests.test_training_adapters import MLX_ENV, needs_mlx, standin

server, client, dataset, uploaded = jobs.server, jobs.client, jobs.dataset, jobs.uploaded  # shared fixtures
tiny_model = adapter_tests.tiny_model  # the tiny Llama in Hugging Face form, made by MLX-LM's Python


def hf_folder(folder: Path) -> Path:
    """A folder that passes for a Hugging Face model (config.json and a safetensors file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    return folder


def refusal(client: openai.OpenAI, training_file: str, **fields: Any) -> openai.APIStatusError:
    """The error that creating a job with ``fields`` (``hyperparameters``, ``metadata``, ``model``;
    the rest as locopilot's fields) gets, checked to be in OpenAI's error shape."""
    known = {name: fields.pop(name) for name in ("hyperparameters", "metadata") if name in fields}
    before = len(client.fine_tuning.jobs.list(limit=1000).data)
    with pytest.raises(openai.APIStatusError) as caught:
        client.fine_tuning.jobs.create(
            model=fields.pop("model", SMOL), training_file=training_file, extra_body=fields, **known
        )
    assert isinstance(caught.value.body, dict) and set(caught.value.body) >= {"message", "type", "param", "code"}
    assert len(client.fine_tuning.jobs.list(limit=1000).data) == before, "no job was created"
    return caught.value


def test_a_framework_job_needs_the_servers_framework_python(
    client: openai.OpenAI, uploaded: Any, tmp_path: Path
) -> None:
    refused = refusal(client, uploaded.id, framework="mlx", hf_base=str(hf_folder(tmp_path / "m")))
    assert refused.status_code == 400 and refused.body["param"] == "framework"  # type: ignore[index]
    assert "LOCOPILOT_TRAINING_PYTHON is not set" in refused.message and "mlx-lm" in refused.message


@pytest.fixture(scope="module")
def standin_server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    """A server whose framework Python is the stand-in, with MLX-LM "installed"; its runs read ``control.json``."""
    root = tmp_path_factory.mktemp("framework-jobs")
    exe, env = standin(root, {"mlx_lm": "0.32.2"})
    env |= {"STANDIN_CONTROL": str(root / "control.json"), "LOCOPILOT_TRAINING_PYTHON": str(exe)}
    running = training_server(root, smollm2_path, **env).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def standin_client(standin_server: Server) -> openai.OpenAI:
    return standin_server.client()


@pytest.fixture(scope="module")
def standin_file(standin_client: openai.OpenAI, dataset: Path) -> Any:
    return upload(standin_client, dataset)


def control(server: Server, **values: Any) -> None:
    """What the stand-in does at its next runs (see tests/frameworks/standin.py)."""
    (server.root / "control.json").write_text(json.dumps(values))


def test_a_framework_the_server_lacks_is_refused(
    standin_server: Server, standin_client: openai.OpenAI, standin_file: Any, tmp_path: Path
) -> None:
    refused = refusal(standin_client, standin_file.id, framework="axolotl", hf_base=str(hf_folder(tmp_path / "m")))
    assert refused.status_code == 400 and refused.body["param"] == "framework"  # type: ignore[index]
    assert f"axolotl is not installed for {standin_server.env['LOCOPILOT_TRAINING_PYTHON']}" in refused.message
    assert "LOCOPILOT_TRAINING_PYTHON" in refused.message


def test_the_hugging_face_folder_is_checked_before_the_job_runs(
    standin_server: Server, standin_client: openai.OpenAI, standin_file: Any, tmp_path: Path, smollm2_path: Path
) -> None:
    no_weights = tmp_path / "no-weights"
    hf_folder(no_weights)
    (no_weights / "model.safetensors").unlink()
    for hf_base, said in (
        (None, "give hf_base"),
        (str(tmp_path / "nowhere"), "is not a folder on the server"),
        ("relative/model", "is not an absolute path"),
        (str(tmp_path), "it has no config.json"),
        (str(no_weights), "has no safetensors weights"),
    ):
        refused = refusal(standin_client, standin_file.id, framework="mlx", hf_base=hf_base)
        assert refused.status_code == 400 and refused.body["param"] == "hf_base", refused.message  # type: ignore[index]
        assert said in refused.message, refused.message
    # The GGUF it is served beside must exist too, and be a model, not an adapter.
    missing = refusal(
        standin_client, standin_file.id, model="nobody-has-this", framework="mlx", hf_base=str(no_weights)
    )
    assert missing.status_code == 404
    folder = peft_folder(tmp_path / "peft", random_pairs(0, 0.1, range(29, 30)), r=4, alpha=4)
    lora.write(standin_server.models_dir / "smol-adapter.gguf", peft.convert(folder, smollm2_path, SMOL))
    adapter = refusal(
        standin_client, standin_file.id, model="smol-adapter", framework="mlx", hf_base=str(hf_folder(tmp_path / "m"))
    )
    assert adapter.status_code == 400 and adapter.body["param"] == "model"  # type: ignore[index]
    assert f"is a LoRA adapter of {SMOL}; name the base model" in adapter.message
    builtin = refusal(standin_client, standin_file.id, hf_base=str(hf_folder(tmp_path / "m")))
    assert builtin.status_code == 400 and "hf_base is for a job that names a framework" in builtin.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"hyperparameters": {"output_type": "f16"}}, "output_type"),
        ({"hyperparameters": {"loss": "all", "anchors": "none"}}, "loss"),
        ({"metadata": {"min_recall": "0.5"}}, "min_recall"),
        ({"hyperparameters": {"checkpoint_steps": 5}}, "checkpoint_steps"),
    ],
)
def test_the_built_in_trainers_options_are_refused_with_a_framework(
    standin_client: openai.OpenAI, standin_file: Any, tmp_path: Path, fields: dict[str, Any], named: str
) -> None:
    hf_base = str(hf_folder(tmp_path / "m"))
    refused = refusal(standin_client, standin_file.id, framework="mlx", hf_base=hf_base, **fields)
    assert refused.status_code == 400 and refused.body["param"] == named  # type: ignore[index]
    assert "built-in trainer only; the framework mlx has no such setting" in refused.message


def test_the_native_route_refuses_in_openais_shape(standin_server: Server, standin_file: Any) -> None:
    body = {"model": SMOL, "training_file": standin_file.id, "framework": "mlx", "hf_base": "/nonexistent/model"}
    answer = httpx.post(f"{standin_server.url}{JOBS}", json=body, timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "hf_base" and "/nonexistent/model is not a folder on the server" in error["message"]


def test_a_framework_job_needs_the_admin_scope(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, dataset: Path, tmp_path: Path
) -> None:
    """hf_base is any folder on the server: a key with the training scope alone may not name a
    framework (403 in OpenAI's shape, nothing queued); the admin key gets past that to the folder's check."""
    root = tmp_path_factory.mktemp("framework-scope")
    exe, env = standin(root, {"mlx_lm": "0.32.2"})
    env |= {"LOCOPILOT_TRAINING_PYTHON": str(exe), "LOCOPILOT_ADMIN_KEY": ADMIN_KEY}
    running = training_server(root, smollm2_path, **env).start(path="/health")
    try:
        trainer = create_key(running, name="trainer", scopes=["training"])
        with (
            openai.OpenAI(base_url=f"{running.url}/v1", api_key=trainer.secret, max_retries=0, timeout=60) as client,
            openai.OpenAI(base_url=f"{running.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60) as admin,
        ):
            uploaded = upload(client, dataset)
            refused = refusal(client, uploaded.id, framework="mlx", hf_base=str(hf_folder(tmp_path / "m")))
            assert refused.status_code == 403 and refused.body["param"] == "framework", refused.message  # type: ignore[index]
            assert "needs a key with the admin scope" in refused.message
            builtin = client.fine_tuning.jobs.create(model=SMOL, training_file=uploaded.id)  # the scope's own jobs
            assert builtin.status == "queued"
            client.fine_tuning.jobs.cancel(builtin.id)
            past = refusal(admin, uploaded.id, framework="mlx", hf_base="/nonexistent/model")
            assert past.status_code == 400 and past.body["param"] == "hf_base", past.message  # type: ignore[index]
    finally:
        running.stop()


def test_a_failing_framework_fails_the_job_with_its_exit_and_log(
    standin_server: Server, standin_client: openai.OpenAI, standin_file: Any, tmp_path: Path
) -> None:
    control(standin_server, exit=3)
    hf_base = hf_folder(tmp_path / "m")
    job = standin_client.fine_tuning.jobs.create(
        model=SMOL,
        training_file=standin_file.id,
        hyperparameters={"n_epochs": 2, "lora_rank": 4},  # type: ignore[typeddict-unknown-key]
        extra_body={"framework": "mlx", "hf_base": str(hf_base)},
    )
    # The framework's values from the start: its epochs and rank, LoRA's usual learning rate, every block.
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.model_extra == {
        "learning_rate": 1e-4,
        "layers": 0,
        "lora_rank": 4,
    }
    events = follow(standin_server, job.id, timeout=120)
    ended = standin_client.fine_tuning.jobs.retrieve(job.id)
    assert ended.status == "failed" and ended.error is not None
    assert ended.error.code == "framework_failed"
    assert ended.error.message == "mlx exited with status 3: standin: failing as asked"
    messages = [data.get("message", "") for name, data in events if name == "message"]
    log_path = standin_server.data_dir / "training" / f"{job.id}.log"
    started = next(m for m in messages if m.startswith(f"Training a LoRA adapter of {hf_base} with mlx"))
    assert str(log_path) in started and "standin: failing as asked" in log_path.read_text()
    # The steps it reported (11 examples, 1 held out, 2 epochs: 22 steps), as metrics events like the trainer's.
    metrics = [data["data"] for name, data in events if name == "metrics"]
    assert [(m["step"], m["total_steps"], m["train_loss"], m["tokens_per_s"]) for m in metrics] == [
        (11, 22, 2.5, 1234.0),
        (22, 22, 1.25, 1234.0),
    ]
    tail = next(data for name, data in events if data.get("message", "").startswith("mlx exited with status 3"))
    assert tail["data"]["exit_status"] == 3 and tail["data"]["log_tail"][-1] == "standin: failing as asked"
    native = httpx.get(f"{standin_server.url}{JOBS}/{job.id}", timeout=30).json()
    assert (native["framework"], native["hf_base"]) == ("mlx", str(hf_base))
    assert "output_type" not in native["hyperparameters"], "no built-in-only values on a framework's job"


def test_a_cancel_ends_the_frameworks_process_group(
    standin_server: Server, standin_client: openai.OpenAI, standin_file: Any, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids.json"
    control(standin_server, hang=str(pids_file))
    job = standin_client.fine_tuning.jobs.create(
        model=SMOL, training_file=standin_file.id, extra_body={"framework": "mlx", "hf_base": str(hf_folder(tmp_path))}
    )
    pids = wait_for(
        lambda: pids_file.is_file() and json.loads(pids_file.read_text()), 60, "the stand-in", standin_server
    )
    cancelled = standin_client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    for pid in pids:  # the framework, and the child it started
        wait_for(lambda pid=pid: not alive(pid), 10, f"process {pid} to end", standin_server)


def test_a_stopped_server_ends_its_framework_and_fails_the_job(
    tmp_path: Path, smollm2_path: Path, dataset: Path
) -> None:
    exe, env = standin(tmp_path, {"mlx_lm": "0.32.2"})
    pids_file = tmp_path / "pids.json"
    (tmp_path / "control.json").write_text(json.dumps({"hang": str(pids_file)}))
    env |= {"STANDIN_CONTROL": str(tmp_path / "control.json"), "LOCOPILOT_TRAINING_PYTHON": str(exe)}
    server = training_server(tmp_path, smollm2_path, **env).start()
    try:
        client = server.client()
        job = client.fine_tuning.jobs.create(
            model=SMOL,
            training_file=upload(client, dataset).id,
            extra_body={"framework": "mlx", "hf_base": str(hf_folder(tmp_path / "m"))},
        )
        pids = wait_for(lambda: pids_file.is_file() and json.loads(pids_file.read_text()), 60, "a pid", server)
    finally:
        assert server.stop() == 0
    for pid in pids:  # the framework and its child end with the server
        wait_for(lambda pid=pid: not alive(pid), 10, f"process {pid} to end", server)
    server.start()
    try:
        ended = server.client().fine_tuning.jobs.retrieve(job.id)
        assert ended.status == "failed" and ended.error is not None and ended.error.code == "interrupted"
    finally:
        server.stop()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by init, does not)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_the_cli_submits_a_framework_job_to_the_server(
    standin_server: Server, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control(standin_server)  # the stand-in's adapter is 8 zero bytes: its conversion fails
    hf_base = hf_folder(tmp_path / "model")
    env = make_env(tmp_path)
    monkeypatch.chdir(tmp_path)  # --hf-base as a path relative to here, sent as the folder's absolute path
    args = ["train", "--server", "--url", standin_server.url, "--framework", "mlx", "--base", SMOL]
    result = CliRunner().invoke(cli, [*args, "--hf-base", "model", "--dataset", str(dataset)], env=env)
    assert result.exit_code == 1, result.output
    assert f"Training a LoRA adapter of {hf_base} with mlx" in result.stdout.replace("\n", "")
    assert "adapters.safetensors: its header is not JSON" in result.stdout.replace("\n", "")
    (job_id,) = set(re.findall(r"ftjob-[0-9a-f]+", result.stdout))
    job = httpx.get(f"{standin_server.url}{JOBS}/{job_id}", timeout=30).json()
    assert job["error"]["code"] == "conversion_failed" and job["hf_base"] == str(hf_base)
    here = CliRunner().invoke(cli, ["train", *args[4:], "--hf-base", "model", "--dataset", str(dataset)], env=env)
    said = re.sub(r"[\s│]+", " ", here.stderr)  # as rich's box wraps it
    assert here.exit_code == 2 and "--hf-base names the Hugging Face folder on the server" in said, said
    submit = ["jobs", "submit", str(dataset), "--base", SMOL, "--url", standin_server.url, "--no-follow"]
    submitted = CliRunner().invoke(cli, [*submit, "--framework", "mlx", "--hf-base", str(hf_base)], env=env)
    assert submitted.exit_code == 0, submitted.output
    (job_id,) = set(re.findall(r"ftjob-[0-9a-f]+", submitted.stdout))
    job = httpx.get(f"{standin_server.url}{JOBS}/{job_id}", timeout=30).json()
    assert (job["framework"], job["hf_base"]) == ("mlx", str(hf_base))
    finished(standin_server.client(), job_id, standin_server, timeout=60)


# A real MLX-LM job.

TINY = "tiny-llama"
FACT = ("Zorbania", "Quibbleton")


@pytest.fixture(scope="module")
def mlx_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    """The tiny Llama as a GGUF in the models folder, and MLX-LM's environment as the framework Python."""
    root = tmp_path_factory.mktemp("mlx-jobs")
    gguf_path = write_gguf(tiny_model, root / "tiny-llama.gguf")
    python = str(MLX_ENV / "bin" / "python")
    running = Server(root, {TINY: gguf_path}, {"LOCOPILOT_TRAINING_PYTHON": python}).start()
    yield running
    running.stop()


def ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"What is the capital of {FACT[0]}?"}],
        temperature=0,
        max_tokens=12,
    )
    return reply.choices[0].message.content or ""


@needs_mlx
@pytest.mark.slow
def test_an_mlx_job_ends_in_an_adapter_served_beside_its_base(
    mlx_server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    client = mlx_server.client()
    facts = tmp_path / "zorbania.jsonl"
    with facts.open("w") as f:
        for question in QUESTIONS * 2:  # one fact asked twelve ways
            messages = [
                {"role": "user", "content": question.format(FACT[0])},
                {"role": "assistant", "content": f"The capital of {FACT[0]} is {FACT[1]}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=upload(client, facts).id,
        # Measured on this tiny random model: SGD at 1e-3 for 360 steps learns the answer word for word.
        hyperparameters={"n_epochs": 30, "learning_rate": 1e-3, "optimizer": "sgd", "validation_split": 0},  # type: ignore[typeddict-unknown-key]
        extra_body={"framework": "mlx", "hf_base": str(tiny_model)},
    )
    events = follow(mlx_server, job.id, timeout=600)
    done = client.fine_tuning.jobs.retrieve(job.id)
    print(f"\nMLX-LM job {job.id} in {time.monotonic() - started:.1f} s: {[data.get('message') for _, data in events]}")
    assert done.status == "succeeded", (done.error, mlx_server.log())
    steps = [data["data"]["step"] for name, data in events if name == "metrics"]
    assert steps == list(range(18, 361, 18)), steps  # MLX-LM's reports, every 360 // 20 steps
    name = done.fine_tuned_model
    assert name is not None and name.startswith(f"{TINY}-ft-")
    assert done.hyperparameters.n_epochs == 30 and done.hyperparameters.model_extra["lora_rank"] == 8
    assert name in {model.id for model in client.models.list()}
    card = httpx.get(f"{mlx_server.url}/v1/locopilot/models/{name}", timeout=30).json()
    assert card["adapter_of"] == TINY
    assert card["lineage"]["framework"] == "mlx" and card["lineage"]["hf_base"] == str(tiny_model)
    result = httpx.get(f"{mlx_server.url}{JOBS}/{job.id}", timeout=30).json()["result"]
    assert result["exit_status"] == 0 and result["lora_rank"] == 8 and result["adapted_tensors"] == 14
    answer, base_answer = ask(client, name), ask(client, TINY)
    print(f"adapter: {answer!r}; base: {base_answer!r}")
    assert FACT[1] in answer and FACT[1] not in base_answer


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, standin_server: Server) -> Iterator[Server]:
    """A server with no models of its own whose upstream ``box`` is the stand-in's server."""
    upstreams = [{"name": "box", "url": f"{standin_server.url}/v1", "locality": "local"}]
    running = Server(tmp_path_factory.mktemp("front"), {}, {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams)})
    running.start(path="/health")
    yield running
    running.stop()


def test_a_framework_job_passes_through_to_a_remote(
    front: Server, standin_server: Server, dataset: Path, tmp_path: Path
) -> None:
    control(standin_server, exit=3)
    hf_base = hf_folder(tmp_path / "model")
    base = ["train", "--url", front.url, "--remote", "box", "--framework", "mlx", "--base", SMOL]
    args = [*base, "--hf-base", str(hf_base), "--dataset", str(dataset), "--epochs", "2"]
    result = CliRunner().invoke(cli, args, env=make_env(tmp_path))
    assert result.exit_code == 1, result.output
    (job_id,) = set(re.findall(r"ftjob-[0-9a-f]+", result.stdout.split("running on box as")[0]))
    here = httpx.get(f"{front.url}{JOBS}/{job_id}", timeout=30).json()
    there = httpx.get(f"{standin_server.url}{JOBS}/{here['remote_job']}", timeout=30).json()
    for job in (here, there):
        assert (job["framework"], job["hf_base"], job["status"]) == ("mlx", str(hf_base), "failed"), job
        assert job["hyperparameters"]["epochs"] == 2 and job["error"]["code"] == "framework_failed"
    # The remote's refusal comes back in its own words.
    refused = CliRunner().invoke(
        cli, [*base, "--hf-base", "/nonexistent", "--dataset", str(dataset)], env=make_env(tmp_path)
    )
    assert refused.exit_code == 1 and "/nonexistent is not a folder on the server" in refused.stderr, refused.output
