"""What every external training framework adapter shares: the job, the plan, the data, the run.

An adapter (one module per framework) only *renders*: :meth:`TrainingFramework.plan` turns an
:class:`ExternalJob` into a :class:`Plan` (the files to write, the command to run) and touches
nothing. :func:`start` (and :func:`run`, which waits) carries a plan out: it writes the files
and runs the command as an argument list (never through a shell), in a process group of its
own, with the framework's own Python, which is never locopilot's: the frameworks need PyTorch
or MLX, and locopilot imports neither.

The frameworks train Hugging Face models (safetensors and ``config.json``), not GGUF. The
base is named the Hugging Face way (a repo id, fetched by the framework itself, or a local
model folder), and the result is a LoRA adapter in ``<output>/adapter`` (MLX-LM:
``adapters.safetensors``; Unsloth and Axolotl: PEFT's ``adapter_model.safetensors``), which
:mod:`locopilot.training.peft` converts to a GGUF LoRA adapter of the same base as a GGUF.
That GGUF of the base takes llama.cpp's ``convert_hf_to_gguf.py``: it is in the
llama-cpp-python sdist (``vendor/llama.cpp``), not in its wheel, and needs PyTorch, so
locopilot does not run it (see README, "External frameworks").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, ClassVar, Protocol

import msgspec

from locopilot.training.hyperparameters import (
    DEFAULT_CONTEXT,
    DEFAULT_LORA_EPOCHS,
    DEFAULT_LORA_LEARNING_RATE,
    DEFAULT_LORA_RANK,
    Context,
    Epochs,
    Layers,
    LearningRate,
    LoraRank,
    Optimizer,
    Seed,
)


class ExternalJob(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One job for an external framework. Paths are absolute.

    ``train_file``/``valid_file``: JSONL, one ``{"messages": [...]}`` conversation a line (what
    :func:`prepare_data` writes). ``layers``: the last N blocks get LoRA weights; 0: all.
    """

    base_model: str
    train_file: str
    valid_file: str | None
    train_examples: int
    output_dir: str
    epochs: Epochs = DEFAULT_LORA_EPOCHS
    learning_rate: LearningRate = DEFAULT_LORA_LEARNING_RATE
    optimizer: Optimizer = "adamw"
    layers: Layers = 0
    context: Context = DEFAULT_CONTEXT
    lora_rank: LoraRank = DEFAULT_LORA_RANK
    seed: Seed = 0
    batch_size: int = 1

    @property
    def steps(self) -> int:
        """Optimizer steps over all epochs, one per batch."""
        return max(1, math.ceil(self.train_examples * self.epochs / self.batch_size))

    @property
    def adapter_dir(self) -> str:
        return str(Path(self.output_dir) / "adapter")


def layer_indices(job: ExternalJob) -> list[int] | None:
    """The indices of the last ``job.layers`` blocks, None for all; from ``config.json`` of a local base.

    Raises FrameworkFailed when only some layers are asked for and the base is a repo id
    (its layer count is not known before the framework downloads it).
    """
    if job.layers == 0:
        return None
    config = Path(job.base_model) / "config.json"
    try:
        n_layer = json.loads(config.read_text())["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FrameworkFailed(
            f"training the last {job.layers} layers needs the layer count from {config}; "
            "give a local model folder as the base, or layers = 0 (all)"
        ) from exc
    if not isinstance(n_layer, int) or n_layer < 1:
        raise FrameworkFailed(f"{config} has no usable num_hidden_layers")
    return list(range(max(0, n_layer - job.layers), n_layer))


class Plan(msgspec.Struct, frozen=True):
    """``files``: name (in the work folder) → text; ``argv[0]`` is the framework's Python;
    ``env``: variables set for the command on top of :data:`QUIET_ENV`; ``steps``: the
    optimizer steps it will run; ``progress``: a regular expression that a line of its output
    (:func:`plain`) matches where it reports a step, with the groups ``step``, ``loss`` and
    ``tokens_per_s`` (digits, maybe with thousands commas); None: its output is not read."""

    argv: list[str]
    files: dict[str, str]
    adapter_dir: str
    env: dict[str, str] = msgspec.field(default_factory=dict)
    steps: int = 0
    progress: str | None = None


_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """A framework's output without terminal escapes (MLX-LM's console writes colors even to a file)."""
    return _TERMINAL_ESCAPE.sub("", text)


#: Every framework run gets these: no usage reports leave the machine (Axolotl sends PostHog
#: telemetry unless told not to; Hugging Face libraries report downloads).
QUIET_ENV = {"DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


def offline_env(job: ExternalJob) -> dict[str, str]:
    """HF_HUB_OFFLINE for a base that is a local folder: then nothing needs fetching, and nothing is."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if Path(job.base_model).is_dir() else {}


class TrainingFramework(Protocol):
    """One framework: its name, the module that says it is installed, how a job becomes a plan."""

    name: ClassVar[str]
    module: ClassVar[str]  # importable in the framework's Python when it is installed
    distribution: ClassVar[str]  # the PyPI name, for its version
    needs: ClassVar[str]  # what it runs on, said to a user

    def plan(self, job: ExternalJob, work_dir: Path, python: str) -> Plan: ...


class FrameworkFailed(Exception):
    """The framework's command could not start or exited non-zero; the message says where its log is."""


class TrainingData(msgspec.Struct, frozen=True):
    train_file: str
    valid_file: str | None
    train_examples: int
    valid_examples: int


def prepare_data(dataset: Path, work_dir: Path, *, validation_split: float, seed: int) -> TrainingData:
    """The dataset (validated first) as ``data/train.jsonl`` and ``data/valid.jsonl`` in OpenAI chat form.

    Every framework reads ``{"messages": [...]}`` lines, whatever the file's own form (Alpaca,
    ShareGPT), and the held-out examples are chosen as the built-in trainer chooses them: by
    example, shuffled with ``seed``. ``valid.jsonl`` is absent when nothing is held out.
    Raises DatasetInvalid.
    """
    from locopilot.training.datasets import Example, iter_examples, validate

    validate(dataset)
    with dataset.open("rb") as f:
        conversations = [item.messages for item in iter_examples(f) if isinstance(item, Example)]
    random.Random(seed).shuffle(conversations)
    n_valid = int(len(conversations) * validation_split)
    folder = work_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train, valid = folder / "train.jsonl", folder / "valid.jsonl"
    _write_jsonl(train, conversations[n_valid:])
    if n_valid:
        _write_jsonl(valid, conversations[:n_valid])
    else:
        valid.unlink(missing_ok=True)
    return TrainingData(
        train_file=str(train),
        valid_file=str(valid) if n_valid else None,
        train_examples=len(conversations) - n_valid,
        valid_examples=n_valid,
    )


def _write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def yaml_text(value: dict[str, object]) -> str:
    """``value`` as block-style YAML that PyYAML's ``safe_load`` reads back equal.

    Scalars are written as JSON (a JSON string is a YAML double-quoted string), except floats,
    which always get a decimal point: YAML 1.1, which PyYAML follows, reads ``1e-05`` as a string.
    """
    lines: list[str] = []
    _yaml_mapping(value, 0, lines)
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: object) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no YAML form here")
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if value is None or isinstance(value, bool | int | str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _yaml_mapping(mapping: dict[str, object], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{json.dumps(key)}:" + (" {}" if not value else ""))
            _yaml_mapping(value, indent + 2, lines)
        elif isinstance(value, list):
            lines.append(f"{pad}{json.dumps(key)}:" + (" []" if not value else ""))
            for item in value:
                if isinstance(item, dict):
                    sub: list[str] = []
                    _yaml_mapping(item, indent + 4, sub)
                    lines.append(f"{pad}  - {sub[0].lstrip()}")
                    lines.extend(sub[1:])
                else:
                    lines.append(f"{pad}  - {_yaml_scalar(item)}")
        else:
            lines.append(f"{pad}{json.dumps(key)}: {_yaml_scalar(value)}")


#: How long a framework's process group has to exit after SIGTERM before it is killed.
STOP_GRACE_S = 5.0


class FrameworkRun:
    """A framework's command, running (:func:`start`) in a process group of its own, which
    :meth:`stop` ends whole: the framework's own children (data loader workers, a launcher's
    ranks) with it. The same shape as :class:`locopilot.children.Child`'s end: ask, wait
    ``grace`` seconds, kill. Unlike locopilot's own children it reads no input, so a server
    killed with SIGKILL cannot end it; it is not told about the server going away.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status, once it has exited; None when ``timeout`` seconds pass first."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float) -> int:
        """SIGTERM to its process group, ``grace`` seconds for the leader to exit, then SIGKILL to
        what is left of the group; the leader's exit status. Safe from another thread than the
        one waiting, and after it has exited (whatever it left running in its group is ended)."""
        self._signal(signal.SIGTERM)
        code = self.wait(grace)
        self._signal(signal.SIGKILL)
        return self.process.wait() if code is None else code

    def _signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group is gone
            os.killpg(self.process.pid, number)


def start(plan: Plan, work_dir: Path, log: IO[bytes]) -> FrameworkRun:
    """Write the plan's files into ``work_dir`` and start its command there, output to ``log``.

    The command is an argument list run without a shell; ``LOCOPILOT_*`` variables are not
    passed on (they may hold keys). Raises FrameworkFailed when it cannot start.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    for name, text in plan.files.items():
        (work_dir / name).write_text(text, encoding="utf-8")
    env = foreign_environment() | QUIET_ENV | plan.env
    try:
        process = subprocess.Popen(
            plan.argv, cwd=work_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, process_group=0
        )
    except OSError as exc:
        raise FrameworkFailed(f"cannot run {plan.argv[0]}: {exc.strerror or exc}") from exc
    return FrameworkRun(process)


def run(plan: Plan, work_dir: Path, log: IO[bytes]) -> None:
    """:func:`start`, and wait for the command to end; Ctrl-C (or any exception while waiting)
    stops its process group. Raises FrameworkFailed when it cannot start or exits non-zero."""
    process = start(plan, work_dir, log)
    try:
        process.wait()
    finally:
        code = process.stop(STOP_GRACE_S)
    if code != 0:
        raise FrameworkFailed(f"{' '.join(plan.argv[:4])} ... exited with status {code}")


PROBE = """
import importlib.metadata, importlib.util, json, sys
found = {}
for module, dist in json.loads(sys.argv[1]).items():
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        continue
    try:
        found[module] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        found[module] = ""
print(json.dumps(found))
"""


def foreign_environment() -> dict[str, str]:
    """The environment for another program (a framework's Python): ours without ``LOCOPILOT_*``
    (they may hold keys) and, in the one-file binary, without what its bootloader set up.

    The bootloader puts its unpacked folder first in ``LD_LIBRARY_PATH`` (keeping the
    original in ``LD_LIBRARY_PATH_ORIG``) and passes ``_PYI_*`` variables to its children:
    another Python would load the bundle's libpython or OpenSSL instead of its own (seen: an
    ImportError from pyenv's Python under a binary built for glibc 2.28), and another
    PyInstaller program would take our folder for its own.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCOPILOT_", "_PYI_"))}
    if getattr(sys, "frozen", False):
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        env.pop("LD_LIBRARY_PATH", None)
        if original:
            env["LD_LIBRARY_PATH"] = original
    return env


def probe(python: str, modules: dict[str, str], *, timeout: float = 30) -> dict[str, str]:
    """Which of ``modules`` (module → distribution) ``python`` can import, with their versions.

    Only looks (``importlib.util.find_spec``), never imports a framework: importing Unsloth
    without a GPU raises, and importing PyTorch takes seconds. Raises FrameworkFailed when
    ``python`` cannot be run.
    """
    try:
        result = subprocess.run(
            [python, "-I", "-c", PROBE, json.dumps(modules)],
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
            env=foreign_environment(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FrameworkFailed(f"cannot run {python}: {exc}") from exc
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise FrameworkFailed(f"{python} failed: {lines[-1] if lines else result.returncode}")
    try:
        found = msgspec.json.decode(result.stdout, type=dict[str, str])
    except msgspec.DecodeError as exc:
        raise FrameworkFailed(f"{python} answered the probe with {result.stdout[:200]!r}") from exc
    return found
