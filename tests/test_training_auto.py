"""The ``auto`` hyperparameter rule (locopilot.training.auto) and its resolution in a job's config.

Fast: headers only, no training. The server test that a job reports the values chosen, and
that a model trained with them answers a trained fact, is in test_training_jobs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from locopilot.models.gguf import GGUFHeader, read_header
from locopilot.training import auto
from locopilot.training.trainer import MAX_LEARNING_RATE, TrainConfig, TrainingRefused, resolve


def header(weights: int, blocks: int) -> GGUFHeader:
    return GGUFHeader(
        version=3,
        tensor_count=1,
        metadata={"general.architecture": "llama", "llama.block_count": blocks},
        parameter_count=weights,
    )


def config(**values: object) -> TrainConfig:
    paths = {"base_path": "/b.gguf", "dataset_path": "/d.jsonl", "output_path": "/o.gguf", "work_dir": "/w"}
    return TrainConfig(**paths, **values)  # type: ignore[arg-type]


def test_the_default_model_gets_the_measured_values(smollm2_path: Path) -> None:
    smol = read_header(smollm2_path)
    assert auto.block_count(smol) == 30
    assert auto.layers(smol) == 15
    assert auto.learning_rate(smol) == pytest.approx(auto.REFERENCE_LEARNING_RATE, rel=0.1)


def test_larger_models_train_a_smaller_share_at_a_smaller_rate() -> None:
    small, large = header(135_000_000, 30), header(8_000_000_000, 32)
    assert auto.layers(small) == 15 and auto.layers(large) == 8
    assert auto.layers(header(50_000_000, 4)) == 4, "never fewer than MIN_LAYERS, never more than the model has"
    assert auto.layers(header(50_000_000, 2)) == 2
    assert auto.learning_rate(large) < auto.learning_rate(small) <= auto.MAX_AUTO_LEARNING_RATE
    assert auto.learning_rate(header(1_000, 2)) == auto.MAX_AUTO_LEARNING_RATE
    assert auto.learning_rate(header(10**15, 200)) == auto.MIN_LEARNING_RATE


def test_epochs_aim_at_the_target_steps() -> None:
    assert auto.epochs(1) == auto.MAX_EPOCHS
    assert auto.epochs(auto.TARGET_STEPS) == 1 and auto.epochs(10 * auto.TARGET_STEPS) == 1
    windows = 15  # 36 short chat examples (40, less 4 held out): the bench's fact sets
    assert auto.epochs(windows) * windows >= auto.TARGET_STEPS > (auto.epochs(windows) - 1) * windows
    assert auto.epochs(windows) == 2  # what recalled the facts there (auto.py)


def test_resolve_fills_only_what_is_auto() -> None:
    model = header(135_000_000, 30)
    resolved, rate, chosen = resolve(config(), model, 14)
    assert chosen == ["epochs", "learning_rate", "layers"]
    assert (resolved.epochs, resolved.learning_rate, resolved.layers) == (auto.epochs(14), rate, 15)
    given, _, chosen = resolve(config(epochs=2, layers=3, learning_rate=2e-4, learning_rate_multiplier=2.0), model, 14)
    assert chosen == [] and (given.epochs, given.layers, given.learning_rate) == (2, 3, pytest.approx(4e-4))
    scaled, rate, chosen = resolve(config(learning_rate_multiplier=0.5), model, 14)
    assert chosen == ["epochs", "learning_rate", "layers"] and scaled.learning_rate == pytest.approx(rate / 2)
    assert scaled.learning_rate_multiplier == 1.0, "applied once, in the resolved rate"


def test_check_refuses_a_rate_out_of_range_after_the_multiplier() -> None:
    config(learning_rate="auto", learning_rate_multiplier=10.0).check()
    with pytest.raises(TrainingRefused, match="learning rate times learning_rate_multiplier must be at most"):
        config(learning_rate=MAX_LEARNING_RATE, learning_rate_multiplier=2.0).check()
    with pytest.raises(TrainingRefused, match="learning_rate_multiplier"):
        config(learning_rate_multiplier=0.0).check()
