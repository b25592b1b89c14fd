"""``locopilot train --config FILE``: a training job's options in a TOML or JSON file.

The file's keys are the flags' names with ``_`` for ``-`` (``learning_rate = 1e-5``); a flag
given on the command line overrides the file. Every value is checked here, with the same
limits as the flags, and an error names the field (``$.epochs``). Relative paths in the file
(``dataset``, and ``base`` when it names an existing file or folder) are taken from the
file's own folder, so a job file and its dataset can move together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from locopilot.training.hyperparameters import Auto, Framework, Hyperparameters, lora_values


class JobFileInvalid(ValueError):
    """The file cannot be read or a value in it is wrong; the message says which field."""


class TrainOptions(Hyperparameters, frozen=True, kw_only=True):
    """Every option of ``locopilot train``: the hyperparameters (with their limits, the flags'
    too) and where the job runs. ``auto`` is the built-in trainer's rule
    (:mod:`locopilot.training.auto`); an external framework's usual value otherwise (the
    ``effective_*`` properties)."""

    base: Annotated[
        str | None,
        Meta(description="Base model: a name in the models folder or a .gguf path (external: an HF repo or folder)."),
    ] = None
    hf_base: Annotated[
        str | None,
        Meta(
            description="With --server and a framework: the base in Hugging Face form, a folder on the server "
            "(BASE is its GGUF there, which serves the adapter)."
        ),
    ] = None
    dataset: Annotated[str | None, Meta(description="JSONL dataset.")] = None
    framework: Annotated[
        Framework,
        Meta(
            description="builtin: llama.cpp, on the GGUF itself. "
            "Others: an installed Unsloth, Axolotl or MLX-LM trains LoRA."
        ),
    ] = "builtin"
    spot_check: Annotated[
        bool, Meta(description="Ask the base and the result a few general questions at the end (builtin).")
    ] = True
    python: Annotated[
        str | None,
        Meta(description="The external framework's Python (default: LOCOPILOT_TRAINING_PYTHON, else python3)."),
    ] = None

    @property
    def builtin(self) -> bool:
        return self.framework == "builtin"

    @property
    def effective_epochs(self) -> int | Auto:
        return self.epochs if self.builtin else lora_values(self).epochs

    @property
    def effective_learning_rate(self) -> float | Auto:
        """The built-in trainer's rule chooses (it changes the weights themselves); LoRA's usual rate
        otherwise; times the multiplier."""
        if self.builtin:
            return "auto" if self.learning_rate == "auto" else self.learning_rate * self.learning_rate_multiplier
        return lora_values(self).learning_rate

    @property
    def effective_layers(self) -> int | Auto:
        """The built-in trainer's rule chooses (memory, forgetting); LoRA is cheap on every block (0)."""
        return self.layers if self.builtin else lora_values(self).layers


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
        hf_base=_resolve(options.hf_base, folder, must_exist=True),
        python=_resolve(options.python, folder, must_exist=True),
    )


def merge(options: TrainOptions, overrides: dict[str, Any]) -> TrainOptions:
    """``options`` with ``overrides`` (flags given on the command line) in place, all checked again."""
    merged = msgspec.structs.asdict(options) | overrides
    try:
        options = msgspec.convert(merged, TrainOptions)
        options.check()
    except (msgspec.ValidationError, ValueError) as exc:
        raise JobFileInvalid(str(exc)) from exc
    return options
