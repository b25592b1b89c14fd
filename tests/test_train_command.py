"""``locopilot train`` on this machine: the eval gate holds a local result back as the server's
jobs do, and options an external framework has no counterpart for are refused, not ignored.

The gate test really trains (one epoch of the last layer on invented facts: under a minute on
2 quiet cores) through the command line, as a user runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from tests.test_cli import make_env
from tests.test_training import facts_dataset
from tests.test_training_adapters import hf_model, standin

SMALL_JOB = ["--epochs", "1", "--layers", "1", "--context", "256", "--anchors", "none", "--output-type", "q8_0"]


def train(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> object:
    return CliRunner().invoke(cli, ["train", *args], env=make_env(tmp_path) | (env or {}))


@pytest.mark.slow
def test_a_local_result_under_its_gate_is_held_back_and_one_over_it_is_published(
    tmp_path: Path, smollm2_path: Path
) -> None:
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    args = ["--base", str(smollm2_path), "--dataset", str(dataset), "--no-spot-check", *SMALL_JOB]

    result = train(tmp_path, *args, "--max-validation-loss", "0.0001")
    assert result.exit_code == 1, result.output + result.stderr
    assert "held back by the eval gate, not published as a model: validation loss" in result.stderr
    assert "above max_validation_loss 0.0001" in result.stderr
    held = list((tmp_path / "data" / "training" / "held").glob("*-ft-*.gguf"))
    assert len(held) == 1 and held[0].stat().st_size > 1_000_000
    assert str(held[0]) in " ".join(result.stderr.split())
    assert not list((tmp_path / "models").glob("*-ft-*")), "a held result is not in the models folder"

    result = train(tmp_path, *args, "--max-validation-loss", "100")
    assert result.exit_code == 0, result.output + result.stderr
    assert "the eval gate passed" in result.output
    published = list((tmp_path / "models").glob("*-ft-*.gguf"))
    assert len(published) == 1 and published[0].stat().st_size > 1_000_000
    assert len(list((tmp_path / "data" / "training" / "held").glob("*.gguf"))) == 1, "only the first one is held"


def test_a_spot_check_threshold_without_the_spot_check_is_refused_before_training(
    tmp_path: Path, smollm2_path: Path
) -> None:
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    args = ["--base", str(smollm2_path), "--dataset", str(dataset), "--no-spot-check", "--min-recall", "0.5"]
    result = train(tmp_path, *args)
    assert result.exit_code == 2
    assert "--min-recall read the spot check's answers: drop --no-spot-check" in result.stderr
    assert not (tmp_path / "data" / "training").exists() or not list((tmp_path / "data" / "training").iterdir())


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--loss", "all"], "--loss"),
        (["--anchors", "none", "--min-recall", "0.5"], "--anchors, --min-recall"),
        (["--output-type", "f16", "--checkpoint-steps", "5"], "--output-type, --checkpoint-steps"),
    ],
)
def test_an_external_framework_refuses_the_built_in_trainers_options(
    tmp_path: Path, flags: list[str], named: str
) -> None:
    exe, env = standin(tmp_path, {"mlx_lm": "0.32.2"})
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    base = hf_model(tmp_path / "m")
    args = ["--framework", "mlx", "--python", str(exe), "--base", str(base), "--dataset", str(dataset)]
    result = train(tmp_path, *args, *flags, env=env)
    assert result.exit_code == 2, result.output + result.stderr
    assert f"{named}: built-in trainer only; --framework mlx has no such setting" in result.stderr
    assert not (tmp_path / "standin.log").exists(), "refused before the framework's Python is asked anything"


def test_the_defaults_pass_for_an_external_framework(tmp_path: Path) -> None:
    dataset = facts_dataset(tmp_path / "facts.jsonl")
    args = ["--framework", "axolotl", "--python", sys.executable, "--base", str(hf_model(tmp_path / "m"))]
    result = train(tmp_path, *args, "--dataset", str(dataset), "--dry-run")
    assert result.exit_code == 0, result.output + result.stderr
