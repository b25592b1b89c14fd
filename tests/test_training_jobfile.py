"""``locopilot train --config FILE``: TOML and JSON job files, checked with errors that name the field."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.training import hyperparameters, jobfile
from locopilot.training.hyperparameters import OutputType
from locopilot.training.jobfile import JobFileInvalid, TrainOptions
from locopilot.training.trainer import OUTPUT_TYPES
from tests.test_cli import make_env


def test_toml_and_json_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        'base = "smollm2-135m-instruct"\ndataset = "facts.jsonl"\nepochs = 3\nlearning_rate = 5e-5\n'
        'optimizer = "sgd"\nlayers = 2\ncontext = 512\nspot_check = false\n'
    )
    values = {
        "base": "smollm2-135m-instruct",
        "dataset": "facts.jsonl",
        "epochs": 3,
        "learning_rate": 5e-5,
        "optimizer": "sgd",
        "layers": 2,
        "context": 512,
        "spot_check": False,
    }
    (tmp_path / "job.json").write_text(json.dumps(values))
    toml, js = jobfile.load(tmp_path / "job.toml"), jobfile.load(tmp_path / "job.json")
    assert toml == js
    assert toml.dataset == str(tmp_path / "facts.jsonl"), "relative to the file's folder"
    assert toml.base == "smollm2-135m-instruct", "a model name is not a path"
    assert (toml.epochs, toml.optimizer, toml.effective_layers, toml.effective_learning_rate) == (3, "sgd", 2, 5e-5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epochs = 0", "`$.epochs`"),
        ('epochs = "three"', "Invalid enum value 'three' - at `$.epochs`"),
        ("learning_rate = 0.5", "`$.learning_rate`"),
        ("context = 300", "multiple of 256 - at `$.context`"),
        ('optimizer = "adam"', "`$.optimizer`"),
        ('framework = "torchtune"', "`$.framework`"),
        ("validation_split = 0.5", "`$.validation_split`"),
        ("epoch = 2", "unknown field `epoch`"),
        ('output_type = "q2_k"', "`$.output_type`"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text + "\n")
    with pytest.raises(JobFileInvalid) as info:
        jobfile.load(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(JobFileInvalid, match="cannot read"):
        jobfile.load(tmp_path / "missing.toml")
    (tmp_path / "job.yaml").write_text("epochs: 1\n")
    with pytest.raises(JobFileInvalid, match=r"is \.toml or \.json"):
        jobfile.load(tmp_path / "job.yaml")
    (tmp_path / "job.toml").write_text("epochs = = 1\n")
    with pytest.raises(JobFileInvalid, match="is not valid TOML"):
        jobfile.load(tmp_path / "job.toml")
    (tmp_path / "job.json").write_text('{"epochs": 1,}')
    with pytest.raises(JobFileInvalid, match="is not valid JSON"):
        jobfile.load(tmp_path / "job.json")


def test_defaults_depend_on_the_framework() -> None:
    builtin, lora = TrainOptions(), TrainOptions(framework="mlx")
    assert (builtin.effective_epochs, builtin.effective_learning_rate, builtin.effective_layers) == ("auto",) * 3
    assert (lora.effective_epochs, lora.effective_learning_rate, lora.effective_layers) == (
        hyperparameters.DEFAULT_LORA_EPOCHS,
        hyperparameters.DEFAULT_LORA_LEARNING_RATE,
        0,
    )


def test_merge_overrides_and_checks_again() -> None:
    merged = jobfile.merge(TrainOptions(epochs=3, layers=2), {"epochs": 5})
    assert (merged.epochs, merged.layers) == (5, 2)
    with pytest.raises(JobFileInvalid, match=r"\$\.context"):
        jobfile.merge(TrainOptions(), {"context": 1000})


def test_the_output_types_agree_with_the_trainer() -> None:
    assert set(typing.get_args(OutputType)) == set(OUTPUT_TYPES)


def run_train(tmp_path: Path, args: list[str]) -> Any:
    return CliRunner().invoke(cli, ["train", *args], env=make_env(tmp_path))


def test_cli_flags_override_the_file_and_the_file_fills_the_rest(tmp_path: Path) -> None:
    """Seen through --dry-run of an external framework, which prints what it would run."""
    from tests.test_training import facts_dataset
    from tests.test_training_adapters import hf_model

    facts_dataset(tmp_path / "facts.jsonl")
    hf_model(tmp_path / "tiny")
    (tmp_path / "job.toml").write_text(
        'framework = "mlx"\nbase = "tiny"\ndataset = "facts.jsonl"\nepochs = 3\nlora_rank = 16\n'
        'python = "/opt/mlx/bin/python"\n'
    )
    result = run_train(tmp_path, ["--config", str(tmp_path / "job.toml"), "--epochs", "2", "--dry-run"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "/opt/mlx/bin/python -m mlx_lm lora --config" in result.output.replace("\n", "")
    import yaml

    config = yaml.safe_load(next((tmp_path / "data" / "training").glob("tiny-mlx-*/work/mlx-lora.yaml")).read_text())
    assert config["model"] == str(tmp_path / "tiny")
    assert config["iters"] == 2 * 27, "--epochs 2 beat the file's 3 (27 training examples)"
    assert config["lora_parameters"]["rank"] == 16, "from the file"
    assert config["learning_rate"] == hyperparameters.DEFAULT_LORA_LEARNING_RATE


def test_cli_reports_a_bad_file_with_the_field(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"base": "x", "dataset": "y", "layers": -1}))
    result = run_train(tmp_path, ["--config", str(tmp_path / "job.json")])
    assert result.exit_code == 2
    assert "`$.layers`" in result.stderr
    (tmp_path / "job.toml").write_text('base = "x"\n')
    result = run_train(tmp_path, ["--config", str(tmp_path / "job.toml")])
    assert result.exit_code == 2 and "give --base MODEL and --dataset FILE" in result.stderr
    (tmp_path / "job2.toml").write_text('base = "x"\ndataset = "nowhere.jsonl"\n')
    result = run_train(tmp_path, ["--config", str(tmp_path / "job2.toml")])
    assert result.exit_code == 2 and "nowhere.jsonl is not a file" in result.stderr
