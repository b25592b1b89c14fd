"""Training with an external framework (Unsloth, Axolotl, MLX-LM) from locopilot's side.

Finds the framework's Python, checks the framework is installed there, turns the dataset
into the JSONL every framework reads, and has the framework's adapter render its config
(:mod:`locopilot.training.adapters`). Running it is :func:`locopilot.training.adapters.base.run`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from locopilot.training.adapters import FRAMEWORKS
from locopilot.training.adapters.base import ExternalJob, FrameworkFailed, Plan, TrainingData, prepare_data, probe
from locopilot.training.hyperparameters import Optimizer


def find_python(explicit: str | None, configured: str) -> str:
    """``explicit`` (``--python``), else ``configured`` (LOCOPILOT_TRAINING_PYTHON), else ``python3`` on PATH."""
    for candidate in (explicit, configured):
        if candidate:
            return candidate
    found = shutil.which("python3")
    if found is None:
        raise FrameworkFailed("no python3 on PATH; set LOCOPILOT_TRAINING_PYTHON to the framework's Python")
    return found


def installed(python: str) -> dict[str, str]:
    """The frameworks importable by ``python``: name → version. Raises FrameworkFailed."""
    found = probe(python, {cls.module: cls.distribution for cls in FRAMEWORKS.values()})
    return {name: found[cls.module] for name, cls in FRAMEWORKS.items() if cls.module in found}


def check_installed(framework: str, python: str, fix: str) -> str:
    """The version of ``framework`` installed for ``python``; FrameworkFailed, ending with ``fix``
    (what the user can do), when it is not there or ``python`` cannot be run."""
    found = installed(python)
    if framework not in found:
        adapter = FRAMEWORKS[framework]
        raise FrameworkFailed(f"{adapter.distribution} is not installed for {python} (it needs {adapter.needs}); {fix}")
    return found[framework]


def hf_folder(folder: str) -> Path:
    """``folder`` as a local Hugging Face model folder: an absolute path to a folder with
    ``config.json`` and safetensors weights (what a server job names, which must not be fetched).
    Raises FrameworkFailed saying what is missing."""
    path = Path(folder)
    if not path.is_absolute():
        raise FrameworkFailed(f"{folder} is not an absolute path")
    if not path.is_dir():
        raise FrameworkFailed(f"{folder} is not a folder on the server")
    if not (path / "config.json").is_file():
        raise FrameworkFailed(f"{folder} is not a Hugging Face model folder: it has no config.json")
    if not any(path.glob("*.safetensors")):
        raise FrameworkFailed(f"{folder} has no safetensors weights (*.safetensors)")
    return path


def base_model(base: str) -> str:
    """A local Hugging Face model folder as an absolute path; anything else (a repo id) as given."""
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FrameworkFailed(f"{base} is not a Hugging Face model folder (it has no config.json)")
        return str(path.resolve())
    if base.endswith(".gguf"):
        raise FrameworkFailed(
            f"{base}: the external frameworks train Hugging Face models (safetensors and config.json), "
            "not GGUF; give a repo id or a local model folder, or use the built-in trainer"
        )
    return base


def plan_job(
    framework: str,
    *,
    base: str,
    dataset: Path,
    output_dir: Path,
    work_dir: Path,
    python: str,
    epochs: int,
    learning_rate: float,
    optimizer: Optimizer,
    layers: int,
    context: int,
    lora_rank: int,
    seed: int,
    validation_split: float,
) -> tuple[Plan, TrainingData]:
    """Write the training data into ``work_dir`` and render the framework's plan.

    Raises FrameworkFailed (a bad base, an unknown layer count) or DatasetInvalid.
    """
    adapter = FRAMEWORKS[framework]()
    data = prepare_data(dataset, work_dir, validation_split=validation_split, seed=seed)
    job = ExternalJob(
        base_model=base_model(base),
        train_file=data.train_file,
        valid_file=data.valid_file,
        train_examples=data.train_examples,
        output_dir=str(output_dir),
        epochs=epochs,
        learning_rate=learning_rate,
        optimizer=optimizer,
        layers=layers,
        context=context,
        lora_rank=lora_rank,
        seed=seed,
    )
    return adapter.plan(job, work_dir, python), data
