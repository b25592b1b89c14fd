"""Server jobs that an external framework trains: a job that names ``framework`` (``unsloth``,
``axolotl``, ``mlx``) instead of the built-in trainer.

Such a job names its base twice: ``model``, the GGUF in the models folder that will serve the
result, and ``hf_base``, the same model in Hugging Face form (a folder on this server with
``config.json`` and safetensors weights), which the framework trains. Nothing is fetched: the
base is a local folder, so the framework runs with ``HF_HUB_OFFLINE``
(:func:`locopilot.training.adapters.base.offline_env`).

Before the job is queued (a 400 naming the field otherwise): :func:`check_request` (what any
server would refuse: options the framework has no counterpart for, no ``hf_base``) and
:func:`check_here` (this server: ``LOCOPILOT_TRAINING_PYTHON`` set and the framework installed
there, as ``locopilot doctor`` lists it; the folder; a GGUF base whose adapters convert).

Running it is the job service's (:meth:`locopilot.training.jobs.JobService._run_framework`):
:func:`plan` (the same planning as ``locopilot train --framework``), then
:func:`locopilot.training.adapters.base.start` in a process group of its own, which a cancel
stops whole, its log read as it grows for the steps it reports (:class:`Reports`); then
:func:`convert` writes the framework's adapter (PEFT's or MLX-LM's) as a
GGUF LoRA adapter of ``model`` (:mod:`locopilot.training.peft`), published as ``BASE-ft-ID``.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from locopilot.errors import InvalidRequest
from locopilot.models.catalog import ModelCatalog
from locopilot.settings import Settings
from locopilot.store.jobs import TrainingJob
from locopilot.training import lora, peft
from locopilot.training.adapters import FRAMEWORKS
from locopilot.training.adapters.base import FrameworkFailed, Plan, TrainingData, plain
from locopilot.training.hyperparameters import Hyperparameters, builtin_only


def check_request(framework: str, hf_base: str | None, hyper: Hyperparameters) -> None:
    """Raises InvalidRequest for a job no server could run: ``hf_base`` without a framework, a
    framework without ``hf_base``, or a built-in-only option set for a framework."""
    if framework == "builtin":
        if hf_base is not None:
            raise InvalidRequest(
                "hf_base is for a job that names a framework (unsloth, axolotl, mlx); "
                "the built-in trainer trains the GGUF model itself",
                param="hf_base",
            )
        return
    if refused := builtin_only(hyper):
        raise InvalidRequest(
            f"{', '.join(refused)}: built-in trainer only; the framework {framework} has no such setting",
            param=refused[0],
        )
    if hf_base is None:
        raise InvalidRequest(
            f"a job with framework {framework} trains the base in Hugging Face form: give hf_base, a folder on "
            "the server with config.json and safetensors (model stays its GGUF, which serves the adapter)",
            param="hf_base",
        )


def check_here(framework: str, hf_base: str, model: str, settings: Settings, catalog: ModelCatalog) -> None:
    """Raises InvalidRequest when this server cannot run the job: no framework environment
    (LOCOPILOT_TRAINING_PYTHON), the framework not installed there, ``hf_base`` not a model
    folder, or a GGUF base that is an adapter or of an architecture whose adapters do not convert.
    Blocks (it runs the framework's Python to look); ModelNotFound for an unknown ``model``."""
    from locopilot.training.external import check_installed, hf_folder

    distribution = FRAMEWORKS[framework].distribution
    if not settings.training_python:
        raise InvalidRequest(
            f"framework {framework} needs a Python with {distribution} on the server, and LOCOPILOT_TRAINING_PYTHON "
            "is not set there; set it to that Python (`locopilot doctor` lists what it has)",
            param="framework",
        )
    try:
        hf_folder(hf_base)
    except FrameworkFailed as exc:
        raise InvalidRequest(f"hf_base: {exc}", param="hf_base") from exc
    entry = catalog.get(model)
    if entry.adapter_of is not None:
        raise InvalidRequest(
            f"The model '{model}' is a LoRA adapter of {entry.adapter_of}; name the base model", param="model"
        )
    if entry.architecture not in peft.ARCHITECTURES:
        raise InvalidRequest(
            f"The model '{model}' is a {entry.architecture or 'unknown'} model; a framework's adapters are "
            f"converted for {', '.join(sorted(peft.ARCHITECTURES))} models only",
            param="model",
        )
    try:  # last: it runs the framework's Python
        check_installed(framework, settings.training_python, "LOCOPILOT_TRAINING_PYTHON names that Python")
    except FrameworkFailed as exc:
        raise InvalidRequest(str(exc), param="framework") from exc


def plan(job: TrainingJob, python: str, work: Path) -> tuple[Plan, TrainingData]:
    """The framework's plan for ``job`` (its params as :meth:`JobSpec.params` stored them), its
    data written into ``work/work`` and its adapter due in ``work/adapter``. Raises
    FrameworkFailed or DatasetInvalid."""
    from locopilot.training.external import plan_job

    assert job.hf_base is not None  # checked at submission
    params = job.params
    return plan_job(
        job.framework,
        base=job.hf_base,
        dataset=Path(job.dataset_path),
        output_dir=work,
        work_dir=work / "work",
        python=python,
        epochs=params["epochs"],
        learning_rate=params["learning_rate"],
        optimizer=params["optimizer"],
        layers=params["layers"],
        context=params["context"],
        lora_rank=params["lora_rank"],
        seed=job.seed,
        validation_split=params["validation_split"],
    )


def convert(plan: Plan, base_path: Path, base_name: str, target: Path) -> lora.Adapter:
    """Write the framework's adapter as a GGUF LoRA adapter of the GGUF ``base_path`` (the model
    ``base_name``) at ``target``; raises AdapterError for one that cannot be converted."""
    adapter = peft.convert(Path(plan.adapter_dir), base_path, base_name)
    lora.write(target, adapter)
    return adapter


class Reported(msgspec.Struct, frozen=True):
    """One step the framework reported in its output."""

    step: int
    loss: float
    tokens_per_s: float


class Reports:
    """The steps a framework reports in its log (``plan.progress``), read as the log grows.

    :meth:`read` returns those in the lines completed since the last call; a plan without a
    ``progress`` pattern reports none.
    """

    def __init__(self, plan: Plan, log_path: Path) -> None:
        self.pattern = None if plan.progress is None else re.compile(plan.progress)
        self.log_path = log_path
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.partial = b""

    def read(self) -> list[Reported]:
        if self.pattern is None:
            return []
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        found = []
        for line in lines:
            if match := self.pattern.match(plain(line.decode(errors="replace"))):
                speed = match["tokens_per_s"].replace(",", "")
                found.append(Reported(int(match["step"]), float(match["loss"]), float(speed)))
        return found
