"""``locopilot train --config FILE``: a training job's options in a TOML or JSON file.

The file's keys are the flags' names with ``_`` for ``-`` (``learning_rate = 1e-5``); a flag
given on the command line overrides the file. Every value is checked here, with the same
limits as the flags, and an error names the field (``$.epochs``). Relative paths in the file
(``dataset``, and ``base`` when it names an existing file or folder) are taken from the
file's own folder, so a job file and its dataset can move together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from locopilot.training.trainer import CONTEXT_STEP, DEFAULT_CONTEXT, MAX_LEARNING_RATE, Auto

DEFAULT_LORA_LEARNING_RATE = 1e-4
#: External frameworks' epochs when none are given (the built-in trainer chooses its own).
DEFAULT_LORA_EPOCHS = 1

Framework = Literal["builtin", "unsloth", "axolotl", "mlx"]
OutputType = Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


class JobFileInvalid(ValueError):
    """The file cannot be read or a value in it is wrong; the message says which field."""


class TrainOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every option of ``locopilot train``, with its default and limits (the flags have the same)."""

    base: str | None = None
    dataset: str | None = None
    framework: Framework = "builtin"
    # None: the framework's default (the effective_* properties); the built-in trainer's is
    # "auto", chosen by locopilot.training.auto from the model's and the dataset's size.
    epochs: Annotated[int, Meta(ge=1, le=100)] | Auto | None = None
    learning_rate: Annotated[float, Meta(gt=0, le=MAX_LEARNING_RATE)] | Auto | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    layers: Annotated[int, Meta(ge=0, le=1024)] | Auto | None = None
    context: Annotated[int, Meta(ge=CONTEXT_STEP, le=1 << 20, multiple_of=CONTEXT_STEP)] = DEFAULT_CONTEXT
    validation_split: Annotated[float, Meta(ge=0, lt=0.5)] = 0.1
    seed: Annotated[int, Meta(ge=0)] = 0
    output_type: OutputType = "q8_0"
    spot_check: bool = True
    # External frameworks only (locopilot/training/adapters/).
    python: str | None = None
    lora_rank: Annotated[int, Meta(ge=1, le=1024)] = 8

    @property
    def builtin(self) -> bool:
        return self.framework == "builtin"

    @property
    def effective_epochs(self) -> int | Auto:
        if isinstance(self.epochs, int):
            return self.epochs
        return "auto" if self.builtin else DEFAULT_LORA_EPOCHS

    @property
    def effective_learning_rate(self) -> float | Auto:
        """The built-in trainer's rule chooses (it changes the weights themselves); LoRA's usual rate otherwise."""
        if isinstance(self.learning_rate, float):
            return self.learning_rate
        return "auto" if self.builtin else DEFAULT_LORA_LEARNING_RATE

    @property
    def effective_layers(self) -> int | Auto:
        """The built-in trainer's rule chooses (memory, forgetting); LoRA is cheap on every block (0)."""
        if isinstance(self.layers, int):
            return self.layers
        return "auto" if self.builtin else 0


def _resolve(value: str | None, folder: Path, *, must_exist: bool) -> str | None:
    if value is None or Path(value).is_absolute():
        return value
    candidate = folder / value
    if must_exist and not candidate.exists():
        return value  # a model name or a Hugging Face repo id, not a path
    return str(candidate)


def load(path: Path) -> TrainOptions:
    """The options in ``path`` (``.toml`` or ``.json``); raises JobFileInvalid."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JobFileInvalid(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        match path.suffix.lower():
            case ".toml":
                options = msgspec.toml.decode(raw, type=TrainOptions)
            case ".json":
                options = msgspec.json.decode(raw, type=TrainOptions)
            case _:
                raise JobFileInvalid(f"{path}: a job file is .toml or .json, not {path.suffix or 'no suffix'}")
    except msgspec.ValidationError as exc:
        raise JobFileInvalid(f"{path}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise JobFileInvalid(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    folder = path.resolve().parent
    return msgspec.structs.replace(
        options,
        dataset=_resolve(options.dataset, folder, must_exist=False),
        base=_resolve(options.base, folder, must_exist=True),
        python=_resolve(options.python, folder, must_exist=True),
    )


def merge(options: TrainOptions, overrides: dict[str, Any]) -> TrainOptions:
    """``options`` with ``overrides`` (flags given on the command line) in place, all checked again."""
    merged = msgspec.structs.asdict(options) | overrides
    try:
        return msgspec.convert(merged, TrainOptions)
    except msgspec.ValidationError as exc:
        raise JobFileInvalid(str(exc)) from exc
