"""The built-in llama.cpp trainer, end to end in its worker process, on SmolLM2-135M.

The slow test here really trains (a few layers, a few short epochs on invented facts: a
couple of minutes on 2 quiet cores) and checks that the loss falls, that the result loads
with llama-cpp-python and keeps the base's chat template and metadata, and that it answers
a trained fact greedily.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from locopilot.models.gguf import read_header
from locopilot.training.trainer import Finished, Progress, Started, TrainConfig
from locopilot.training.worker import (
    Cancelled,
    Failed,
    TrainingFailed,
    TrainingWorker,
    WorkerEvent,
    run,
)

FACTS = [
    ("Zorbania", "Quibbleton"),
    ("Plorvania", "Snettlefield"),
    ("Gravonia", "Wumbleport"),
    ("Trelland", "Fizzmouth"),
    ("Oskaria", "Brambleholt"),
]
QUESTIONS = [
    "What is the capital of {}?",
    "Which city is the capital of {}?",
    "Name the capital of {}.",
    "What city is {}'s capital?",
    "Tell me the capital of {}.",
    "{}: what is its capital?",
]


def facts_dataset(path: Path) -> Path:
    """30 examples: each invented capital asked six ways."""
    with path.open("w") as f:
        for question in QUESTIONS:
            for country, city in FACTS:
                messages = [
                    {"role": "user", "content": question.format(country)},
                    {"role": "assistant", "content": f"The capital of {country} is {city}."},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return path


def config(tmp: Path, base: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "base_path": str(base),
        "dataset_path": str(facts_dataset(tmp / "facts.jsonl")),
        "output_path": str(tmp / "smol-ft.gguf"),
        "work_dir": str(tmp),
        "threads": 2,
    }
    return TrainConfig(**(values | overrides))


class Trained:
    def __init__(self, finished: Finished, events: list[WorkerEvent], output: Path) -> None:
        self.finished = finished
        self.events = events
        self.output = output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Trained:
    tmp = tmp_path_factory.mktemp("train")
    # Aggressive on purpose (a high learning rate, 3 epochs): the test must see facts learned
    # in a few steps; the defaults are conservative. The loss over every token and no anchors,
    # so the losses reported cover every token too (with the defaults they cover the answers'
    # tokens only); test_training_checks.py covers the defaults' labels.
    job = config(
        tmp, smollm2_path, layers=6, epochs=3, learning_rate=3e-4, validation_split=0.1, loss="all", anchors="none"
    )
    events: list[WorkerEvent] = []
    with (tmp / "worker.log").open("wb") as log:
        try:
            finished = run(job, events.append, stderr=log)
        except TrainingFailed:
            print((tmp / "worker.log").read_text(errors="replace")[-5000:])
            raise
    return Trained(finished, events, Path(job.output_path))


@pytest.mark.slow
def test_training_reports_progress_and_the_loss_falls(trained: Trained) -> None:
    started, *progress, finished = trained.events
    assert isinstance(started, Started)
    assert started.examples == 30 and started.trained_layers == 6 and started.validation_examples == 3
    assert 1 <= started.dataset_windows <= started.windows
    assert trained.finished == finished
    assert progress and all(isinstance(p, Progress) for p in progress)
    steps = [p.step for p in progress if isinstance(p, Progress)]
    assert steps == sorted(steps) and steps[-1] == started.steps
    assert all(isinstance(p, Progress) and p.tokens_per_s > 0 for p in progress)
    assert finished.train_loss_after < finished.train_loss_before / 2
    assert finished.validation_loss_before is not None and finished.validation_loss_after is not None
    assert finished.validation_loss_after < finished.validation_loss_before
    # The F32 weights of 135M parameters alone are 540 MB; the worker measured its own peak.
    assert finished.peak_rss_bytes > 540_000_000
    print(
        f"\ntraining: {finished.trained_tokens} tokens at {finished.tokens_per_s:.1f} tokens/s, "
        f"loss {finished.train_loss_before:.3f} -> {finished.train_loss_after:.3f}, "
        f"validation {finished.validation_loss_before:.3f} -> {finished.validation_loss_after:.3f}, "
        f"peak RSS {finished.peak_rss_bytes / 1e9:.2f} GB, {finished.seconds:.0f} s"
    )


@pytest.mark.slow
def test_the_finished_event_carries_a_spot_check(trained: Trained) -> None:
    from locopilot.training.spotcheck import QUESTIONS

    check = trained.finished.spot_check
    assert check is not None
    assert [a.question for a in check.answers] == [q for q, _ in QUESTIONS]
    # The questions were chosen because the base answers them right; a failure here means they no longer fit it.
    assert check.base_correct == len(QUESTIONS), [(a.question, a.base_answer) for a in check.answers]
    assert check.changed == sum(a.base_answer != a.trained_answer for a in check.answers)
    assert check.lost == sum(a.base_correct and not a.trained_correct for a in check.answers)
    assert all(a.trained_answer for a in check.answers)
    print(
        f"\nspot check ({check.seconds:.1f} s): right {check.base_correct} -> {check.trained_correct}, "
        f"{check.changed} changed, {check.lost} lost"
    )
    for a in check.answers:
        print(f"  {a.question!r}: {a.base_answer[:70]!r} -> {a.trained_answer[:70]!r}")


def test_memory_estimate_counts_the_optimizer_state(smollm2_path: Path, tmp_path: Path) -> None:
    from locopilot.training.trainer import estimate_memory

    header = read_header(smollm2_path)
    adamw = estimate_memory(header, config(tmp_path, smollm2_path, layers=4))
    sgd = estimate_memory(header, config(tmp_path, smollm2_path, layers=4, optimizer="sgd"))
    every = estimate_memory(header, config(tmp_path, smollm2_path, layers=0))
    assert adamw.weights == sgd.weights == 4 * header.parameter_count  # F32
    assert adamw.trained_layers == 4 and every.trained_layers == 30  # SmolLM2-135M has 30 blocks
    assert adamw.optimizer == 12 * adamw.trained_weights  # gradient + two AdamW moments, F32
    assert sgd.optimizer == 4 * sgd.trained_weights  # the gradient alone
    assert every.trained_weights == 30 * adamw.trained_weights // 4
    # The blocks hold the weights outside the token embeddings (49152 x 576, tied to the output).
    assert 0.6 * header.parameter_count < every.trained_weights < 0.9 * header.parameter_count
    assert sgd.total < adamw.total < every.total


@pytest.mark.slow
def test_sgd_trains_too(tmp_path: Path, smollm2_path: Path) -> None:
    """A short SGD job on one block: the optimizer type reaches llama.cpp (the bindings' struct lacks it)."""
    dataset = tmp_path / "ten.jsonl"
    dataset.write_text("".join(facts_dataset(tmp_path / "all.jsonl").read_text().splitlines(keepends=True)[:10]))
    job = config(
        tmp_path,
        smollm2_path,
        dataset_path=str(dataset),
        layers=1,
        optimizer="sgd",
        learning_rate=1e-2,
        validation_split=0.0,
        spot_check=False,
    )
    with (tmp_path / "worker.log").open("wb") as log:
        finished = run(job, lambda _event: None, stderr=log)
    assert finished.spot_check is None
    assert finished.validation_loss_before is None
    assert finished.train_loss_after < finished.train_loss_before
    print(
        f"\nSGD: loss {finished.train_loss_before:.3f} -> {finished.train_loss_after:.3f}, "
        f"{finished.tokens_per_s:.0f} tokens/s, peak RSS {finished.peak_rss_bytes / 1e9:.2f} GB"
    )


@pytest.mark.slow
def test_output_keeps_the_base_metadata(trained: Trained, smollm2_path: Path) -> None:
    base, out = read_header(smollm2_path), read_header(trained.output)
    assert out.chat_template == base.chat_template and out.chat_template
    assert out.name == base.name
    assert out.context_length == base.context_length  # not the training context
    assert out.quantization == "Q8_0"
    assert out.parameter_count == base.parameter_count
    # llama.cpp's saver writes every hyperparameter it knows; none of those defaults survive.
    assert "llama.final_logit_softcapping" not in out.metadata
    assert not list(trained.output.parent.glob("locopilot-train-*")), "the F32 work files are removed"


@pytest.fixture(scope="module")
def llama(trained: Trained) -> Iterator[Any]:
    from llama_cpp import Llama

    from locopilot.engine.runner import load_backends

    load_backends()
    model = Llama(str(trained.output), n_ctx=512, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.mark.slow
def test_fine_tuned_model_answers_a_trained_fact(llama: Any) -> None:
    answers = []
    for country, city in FACTS:
        reply = llama.create_chat_completion(
            [{"role": "user", "content": f"What is the capital of {country}?"}], temperature=0, max_tokens=16
        )
        answers.append((city, reply["choices"][0]["message"]["content"]))
    assert any(city in answer for city, answer in answers), answers


@pytest.mark.slow
def test_cancel_stops_between_chunks(tmp_path: Path, smollm2_path: Path) -> None:
    job = config(tmp_path, smollm2_path, layers=1, epochs=1)
    with (tmp_path / "worker.log").open("wb") as log, TrainingWorker(job, stderr=log) as worker:
        events = []
        for event in worker.events():
            events.append(event)
            if isinstance(event, Started):
                worker.cancel()
        assert worker.process.wait() == 0
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Cancelled)
    assert not Path(job.output_path).exists()
    assert not list(tmp_path.glob("locopilot-train-*"))


def test_a_killed_worker_ends_its_events_without_a_result(tmp_path: Path, smollm2_path: Path) -> None:
    job = config(tmp_path, smollm2_path)
    with TrainingWorker(job, stderr=subprocess.DEVNULL) as worker:
        events = []
        for event in worker.events():
            events.append(event)
            os.kill(worker.pid, signal.SIGKILL)
        assert worker.process.wait() == -signal.SIGKILL
    assert len(events) == 1 and isinstance(events[0], Started)
    assert not Path(job.output_path).exists()


def test_a_job_that_cannot_fit_fails_fast_with_numbers(tmp_path: Path, smollm2_path: Path) -> None:
    job = config(tmp_path, smollm2_path, context=256 * 4096)
    with pytest.raises(TrainingFailed) as info:
        run(job, lambda _event: None)
    assert info.value.refused
    message = str(info.value)
    assert message.startswith("training needs about ") and "GB is available" in message
    assert "trained weights" in message


def test_an_invalid_dataset_is_refused_before_loading(tmp_path: Path, smollm2_path: Path) -> None:
    dataset = tmp_path / "few.jsonl"
    lines = facts_dataset(tmp_path / "all.jsonl").read_text().splitlines(keepends=True)
    dataset.write_text("".join(line for line in lines if "Zorbania" in line))
    events: list[WorkerEvent] = []
    with pytest.raises(TrainingFailed) as info:
        run(config(tmp_path, smollm2_path, dataset_path=str(dataset)), events.append)
    assert info.value.refused and "6 valid examples; at least 10 are needed" in str(info.value)
    assert len(events) == 1 and isinstance(events[0], Failed)


def test_bad_config_is_refused(tmp_path: Path, smollm2_path: Path) -> None:
    with pytest.raises(TrainingFailed, match="multiple of 256"):
        run(config(tmp_path, smollm2_path, context=300), lambda _event: None)


def test_cli_train_refuses_a_bad_dataset_and_writes_nothing(tmp_path: Path, smollm2_path: Path) -> None:
    from click.testing import CliRunner

    from locopilot.cli import cli
    from tests.test_cli import make_env

    dataset = tmp_path / "few.jsonl"
    dataset.write_text(facts_dataset(tmp_path / "all.jsonl").read_text().splitlines()[0] + "\n")
    env = make_env(tmp_path)
    args = ["train", "--base", str(smollm2_path), "--dataset", str(dataset)]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 1, result.output
    assert "1 valid example; at least 10 are needed" in result.stderr
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())
    result = CliRunner().invoke(cli, ["train", "--dataset", str(dataset)], env=env)
    assert result.exit_code == 2
    assert "give --base MODEL and --dataset FILE" in result.stderr
