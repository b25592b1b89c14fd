"""The built-in trainer: fine-tune a GGUF with llama.cpp's own training API, no PyTorch.

:func:`train` runs in a worker process (see :mod:`locopilot.training.worker`): a failed
``GGML_ASSERT`` aborts the whole process, and a step cannot be interrupted. The loop:

1. Check the dataset (:func:`~locopilot.training.datasets.validate`) and that the job fits in
   memory (:func:`estimate_memory`), before anything is loaded.
2. Render every example with the model's chat template and tokenize it; hold out a few
   examples for a validation loss; mix the anchors (:mod:`locopilot.training.anchors`) into
   the rest, concatenate them and cut windows of ``context`` tokens, half overlapping
   (:func:`windows`).
3. Convert the base to F32 (llama.cpp trains F32 tensors only) with ``llama_model_quantize``,
   load it without mmap (the weights are written), and ``llama_opt_init`` with a parameter
   filter that marks only the last ``layers`` blocks trainable. Unless ``spot_check`` is off,
   the base answers a few general questions (:mod:`locopilot.training.spotcheck`, generated
   in a second, ordinary context on the same weights: :meth:`TrainingSession.generate`). One
   forward pass of the base over each example labels the positions not trained with its own
   predictions and measures the losses before (:meth:`TrainingSession.evaluate`).
4. Train in chunks of ``chunk_windows`` windows per ``llama_opt_epoch`` call, one optimizer step
   per window; between chunks the learning rate is updated, progress reported and
   cancellation checked. A job that publishes a LoRA adapter (``lora_rank``) trains the
   blocks' matrices only and cuts each one's change back to that rank between chunks
   (:meth:`TrainingSession.project`).
5. Measure the losses after; the trained weights answer the spot check's questions and the
   held-out examples' (the recall check), reported with the base's answers in Finished.
6. Save with ``llama_model_save_to_file`` and export (:mod:`locopilot.training.export`):
   quantize (Q8_0 by default) and copy the base's metadata back; or, with ``lora_rank``,
   extract the adapter (:func:`~locopilot.training.lora.extract`).
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, NamedTuple

import msgspec
from msgspec import Meta

from locopilot.models.gguf import ArrayInfo, GGUFHeader, read_header
from locopilot.training.hyperparameters import MAX_LEARNING_RATE, HyperparameterInvalid, Hyperparameters
from locopilot.training.session import TrainingSession
from locopilot.training.spotcheck import MAX_RECALL, MAX_TOKENS, RECALL_TOKENS, RecallItem, SpotCheck, spot_check

OUTPUT_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # enum llama_ftype


class TrainConfig(Hyperparameters, frozen=True, kw_only=True):
    """One training job: its hyperparameters (see :mod:`locopilot.training.hyperparameters`:
    ``auto`` ones are chosen from the model's and the dataset's size by
    :mod:`locopilot.training.auto` when the job starts, and reported in :class:`Started`) and
    where it runs. Paths are absolute; ``work_dir`` holds the F32 copies (4 bytes per weight each).
    """

    base_path: str
    dataset_path: str
    output_path: str
    work_dir: str
    chunk_windows: Annotated[int, Meta(ge=1)] = 4
    threads: Annotated[int, Meta(ge=0)] = 0  # 0: every CPU
    spot_check: bool = True  # ask the base and the result a few general questions at the end
    # With ``lora_rank``: the base's name in the models folder, which the adapter names.
    base_name: str = ""
    # Where checkpoints go (``checkpoint_steps``); a job started again with one there resumes from it. "": none.
    checkpoint_dir: str = ""

    def check(self) -> None:
        """Raises TrainingRefused for a value no job can run with."""
        try:
            super().check()
        except HyperparameterInvalid as exc:
            raise TrainingRefused(str(exc)) from exc


# Events the trainer reports, in order: Started, Progress..., Finished (or an exception).


class Started(msgspec.Struct, tag="started"):
    """``windows``: training windows of ``context`` tokens per epoch, anchors included; one
    optimizer step each. ``dataset_windows``: those the dataset's own examples fill, which the
    ``auto`` epochs count.

    ``epochs``, ``learning_rate`` and ``layers``: the values the job runs with, ``auto`` ones
    resolved; ``chosen`` names those that were ``auto``; ``auto_learning_rate`` is the rate
    the rule picks for this model (what ``learning_rate_multiplier`` multiplies).
    """

    examples: int
    validation_examples: int
    tokens: int
    windows: int
    steps: int
    trained_layers: int
    trained_weights: int
    estimate_bytes: int
    epochs: int = 0
    learning_rate: float = 0.0
    layers: int = 0
    auto_learning_rate: float = 0.0
    chosen: list[str] = msgspec.field(default_factory=list)
    lora_rank: int | None = None  # the adapter's rank, for a job that publishes one
    dataset_windows: int = 0  # the dataset's own windows, anchors left out: what ``auto`` epochs counts


class Progress(msgspec.Struct, tag="progress"):
    epoch: int
    step: int
    steps: int
    loss: float
    tokens_per_s: float
    elapsed_s: float


class Finished(msgspec.Struct, tag="finished"):
    """``*_before``/``*_after``: the mean cross-entropy of the trained tokens (the answers', or
    every token with ``loss`` ``all``) of the training examples and of the held-out ones, before
    and after training. Each example is scored on its own, from the logits at those positions
    only: the positions labelled with the base's predictions are left out, so the validation
    loss measures what was learned, not the drift from the base.

    ``spot_check``: the base's and the result's answers to a few general questions
    (:mod:`locopilot.training.spotcheck`); None when the job asked for none.
    """

    output_path: str
    train_loss_before: float
    train_loss_after: float
    validation_loss_before: float | None
    validation_loss_after: float | None
    tokens_per_s: float
    trained_tokens: int
    seconds: float
    peak_rss_bytes: int
    spot_check: SpotCheck | None = None
    cpu_seconds: float = 0.0
    """The worker's CPU time (user and system): on a shared machine, closer to the job's cost than ``seconds``."""
    stage_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    """Wall time of each part: prepare (dataset, F32 copy), spot_check_base (the base's answers),
    relabel (labels and losses before), train, loss_after, spot_check, export (or extract)."""
    stage_cpu_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    """The worker's CPU time in each part of ``stage_seconds``."""


class Checkpointed(msgspec.Struct, tag="checkpoint"):
    """The weights after ``step`` optimizer steps are saved; ``resumed``: this job started from them."""

    step: int
    steps: int
    seconds: float
    resumed: bool = False


Event = Started | Progress | Checkpointed | Finished


class TrainingRefused(Exception):
    """The job cannot start (bad dataset, config or memory); nothing was trained."""


class TrainingCancelled(Exception):
    """Cancelled between chunks; nothing was written to ``output_path``."""


class MemoryEstimate(msgspec.Struct, frozen=True):
    weights: int
    optimizer: int
    compute: int
    trained_weights: int
    trained_layers: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.compute


def _int(header: GGUFHeader, key: str) -> int:
    value = header.metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TrainingRefused(f"the base model has no {key}")
    return value


def estimate_memory(header: GGUFHeader, config: TrainConfig) -> MemoryEstimate:
    """About 4 bytes per weight (F32), 12 more per trained weight (gradient and AdamW's moments; SGD 4), and the graph.

    Blocks are taken as equal shares of the weights outside the token embeddings, which
    overestimates a little when the output matrix is separate. The compute term covers the
    logits and their gradients and each layer's activations for one window.
    """
    arch = header.architecture or ""
    n_layer = _int(header, f"{arch}.block_count")
    n_embd = _int(header, f"{arch}.embedding_length")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens) if isinstance(tokens, list) else 0
    layers = 0 if config.layers == "auto" else config.layers
    trained_layers = n_layer if layers == 0 else min(layers, n_layer)
    per_layer = max(0, header.parameter_count - n_vocab * n_embd) // n_layer
    trained = per_layer * trained_layers
    per_trained = 12 if config.optimizer == "adamw" else 4
    compute = 4 * config.context * (3 * n_vocab + 16 * n_embd * n_layer)
    return MemoryEstimate(
        weights=4 * header.parameter_count,
        optimizer=per_trained * trained,
        compute=compute,
        trained_weights=trained,
        trained_layers=trained_layers,
    )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (not checked)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_resources(header: GGUFHeader, config: TrainConfig) -> MemoryEstimate:
    """Raises TrainingRefused, with the numbers, when memory or the work folder's disk is short."""
    estimate = estimate_memory(header, config)
    available = available_memory()
    gb = 1e9
    if available is not None and estimate.total > available:
        raise TrainingRefused(
            f"training needs about {estimate.total / gb:.2f} GB of memory "
            f"({estimate.weights / gb:.2f} GB F32 weights, {estimate.optimizer / gb:.2f} GB gradients and "
            f"optimizer state for {estimate.trained_weights:,} trained weights, "
            f"{estimate.compute / gb:.2f} GB compute) "
            f"but {available / gb:.2f} GB is available; train fewer layers or a smaller context"
        )
    disk = 2 * estimate.weights  # the F32 base and the F32 result
    free = shutil.disk_usage(config.work_dir).free
    if disk > free:
        raise TrainingRefused(
            f"training needs {disk / gb:.2f} GB free in {config.work_dir}, which has {free / gb:.2f} GB"
        )
    return estimate


class Window(msgspec.Struct):
    """One training window: ``context`` input tokens and the ``context`` labels, one per position.

    llama.cpp's optimizer takes a one-hot label at every position and has no mask; a position
    left with no label would still get a gradient (the softmax itself). So only the trained
    tokens (the answers', see
    :meth:`~locopilot.training.tokenizer.ChatTokenizer.encode_trained`) are labelled with the
    next token of the data; every other position is labelled with what the base model itself
    predicts there (:meth:`TrainingSession.base_labels`): its gradient pulls towards the base's own
    greedy choice, and is near zero wherever the base is confident.
    """

    tokens: list[int]
    labels: list[int]


class Encoded(NamedTuple):
    """One example as trained: its tokens, which of them are trained (see :class:`Window`),
    and for the recall check its last answer and the tokens that prompt for it."""

    tokens: list[int]
    trained: list[bool]
    prompt: list[int]
    question: str
    answer: str


def windows(examples: Sequence[tuple[list[int], list[int]]], context: int) -> list[Window]:
    """Windows of ``context`` tokens, half overlapping, over the examples' concatenation, like
    llama.cpp's ``common_opt_dataset_init``, and one more at the end for the tokens the last
    whole stride leaves out; a concatenation shorter than one window is repeated. Each example
    is its tokens and, aligned with them, each token's label (what the position before it
    learns: the token itself, or the base's prediction there).

    Half overlapping, a token is in two windows of a pass, with different text before it.
    Windows that each started where an example starts (each example whole in one window of a
    pass, 13 windows a pass instead of 23 on the bench's facts) recalled 5 of 16 held-out
    questions in 3 passes at a learning rate of 1e-4 where these recalled 13; at 1.5e-4, 11
    (README)."""
    stream = [token for example in examples for token in example[0]]
    targets = [label for example in examples for label in example[1]]
    single, single_targets = list(stream), list(targets)
    while single and len(stream) <= context:
        stream.extend(single)
        targets.extend(single_targets)
    last = len(stream) - context - 1  # the last start whose labels are all in the stream
    starts = list(range(0, last + 1, max(1, context // 2)))
    if starts[-1] < last:
        starts.append(last)
    return [Window(stream[start : start + context], targets[start + 1 : start + context + 1]) for start in starts]


def encoded_examples(config: TrainConfig) -> list[Encoded]:
    """Each example's tokens, with the base's chat template, and which of them are trained
    (the answers', unless ``loss`` is ``all``). Raises TrainingRefused for an invalid dataset."""
    from locopilot.engine.templates import TemplateError
    from locopilot.training.datasets import DatasetInvalid, Example, iter_examples, validate
    from locopilot.training.tokenizer import ChatTokenizer

    try:
        tokenizer = ChatTokenizer(Path(config.base_path))
    except TemplateError as exc:
        raise TrainingRefused(f"the base model's chat template fails: {exc}") from exc
    try:
        try:
            validate(Path(config.dataset_path), tokenizer, config.context)
        except DatasetInvalid as exc:
            raise TrainingRefused(f"the dataset cannot be trained on:\n{exc}") from exc
        encoded = []
        with open(config.dataset_path, "rb") as f:
            for example in iter_examples(f):
                assert isinstance(example, Example)  # validated above
                tokens, trained = tokenizer.encode_trained(example.messages)
                last = max(i for i, m in enumerate(example.messages) if m.get("role") == "assistant")
                encoded.append(
                    Encoded(
                        tokens,
                        [True] * len(tokens) if config.loss == "all" else trained,
                        tokenizer.prompt(example.messages[:last]),
                        next(
                            (
                                str(m.get("content") or "")
                                for m in reversed(example.messages[:last])
                                if m.get("role") == "user"
                            ),
                            "",
                        ),
                        str(example.messages[last].get("content") or ""),
                    )
                )
        return encoded
    except TemplateError as exc:
        raise TrainingRefused(f"the base model's chat template fails: {exc}") from exc
    finally:
        tokenizer.close()


def anchor_examples(config: TrainConfig) -> list[tuple[list[int], list[bool]]]:
    """The anchors (:mod:`locopilot.training.anchors`) with the base's chat template, no token trained."""
    from locopilot.engine.templates import TemplateError
    from locopilot.training.anchors import conversations
    from locopilot.training.tokenizer import ChatTokenizer

    try:
        tokenizer = ChatTokenizer(Path(config.base_path))
        try:
            encoded = [tokenizer.encode(messages) for messages in conversations()]
        finally:
            tokenizer.close()
    except TemplateError as exc:
        raise TrainingRefused(f"the base model's chat template fails: {exc}") from exc
    return [(tokens, [False] * len(tokens)) for tokens in encoded if len(tokens) <= config.context]


def cpu_seconds() -> float:
    """This process's CPU time so far, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def resolve(config: TrainConfig, header: GGUFHeader, windows: int) -> tuple[TrainConfig, float, list[str]]:
    """``config`` with its ``auto`` values chosen (:mod:`locopilot.training.auto`) and the
    multiplier applied; the rule's learning rate for this model; the names that were auto."""
    from locopilot.training import auto

    chosen = [name for name in ("epochs", "learning_rate", "layers", "lora_rank") if getattr(config, name) == "auto"]
    auto_rate = auto.learning_rate(header)
    rate = auto_rate if config.learning_rate == "auto" else config.learning_rate
    resolved = msgspec.structs.replace(
        config,
        epochs=auto.epochs(windows) if config.epochs == "auto" else config.epochs,
        learning_rate=min(MAX_LEARNING_RATE, rate * config.learning_rate_multiplier),
        learning_rate_multiplier=1.0,
        layers=auto.layers(header) if config.layers == "auto" else config.layers,
        lora_rank=auto.lora_rank(header) if config.lora_rank == "auto" else config.lora_rank,
    )
    return resolved, auto_rate, chosen


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def publish(config: TrainConfig, f32: Path, trained: Path, stage: Callable[[str], None]) -> None:
    """Write the job's result to ``config.output_path``: an adapter extracted from the trained
    weights (``lora_rank``) or the whole model in ``output_type``. ``stage`` is told when it ends."""
    if isinstance(config.lora_rank, int):
        from locopilot.training import lora

        adapter = lora.extract(f32, trained, config.lora_rank, config.base_name)
        lora.write(Path(config.output_path), adapter)
        stage("extract")
    else:
        from locopilot.training.export import export

        export(trained, Path(config.base_path), Path(config.output_path), config.output_type, threads=config.threads)
        stage("export")


def spot_prompts(config: TrainConfig) -> list[list[int]]:
    """The spot check's questions (:mod:`locopilot.training.spotcheck`) with the base's chat
    template; none without ``spot_check``."""
    from locopilot.engine.templates import TemplateError
    from locopilot.training import spotcheck
    from locopilot.training.tokenizer import ChatTokenizer

    if not config.spot_check:
        return []
    try:
        tokenizer = ChatTokenizer(Path(config.base_path))
        try:
            return spotcheck.prompts(tokenizer)
        finally:
            tokenizer.close()
    except TemplateError as exc:
        raise TrainingRefused(f"the base model's chat template fails: {exc}") from exc


class CheckpointState(msgspec.Struct):
    """What a resumed job needs besides the weights: how far it got, the losses measured
    before training, and every training window's labels as the base labelled them, so that a
    resumed job trains on exactly what it started with; and the base's answers to the spot
    check (``spot_seconds`` the time they took)."""

    step: int
    weights: str  # the file name, in the checkpoint folder
    fingerprint: str
    train_seconds: float
    loss_before: float
    validation_loss_before: float | None
    labels: list[list[int]]
    spot_before: list[str] = msgspec.field(default_factory=list)
    spot_seconds: float = 0.0


def fingerprint(config: TrainConfig, training: list[Window], validation: Sequence[tuple[list[int], list[bool]]]) -> str:
    """What must not change between a checkpoint and its resumption: the resolved
    hyperparameters, the windows' tokens and the held-out examples' (the dataset as the
    template rendered it)."""
    import hashlib

    digest = hashlib.sha256()
    fields = (
        "epochs",
        "learning_rate",
        "optimizer",
        "weight_decay",
        "layers",
        "context",
        "chunk_windows",
        "seed",
        "spot_check",
    )
    digest.update(msgspec.json.encode({name: getattr(config, name) for name in fields}))
    for tokens in (*(window.tokens for window in training), *(tokens for tokens, _ in validation)):
        digest.update(msgspec.json.encode(tokens))
    return digest.hexdigest()


class Checkpoints:
    """A job's checkpoint folder: at most one complete checkpoint, replaced atomically.

    The weights go to a new file named by step, then ``state.json`` is replaced to name it,
    then older weights are removed: a kill at any moment leaves the last complete checkpoint.
    llama.cpp exposes no optimizer state, so a resumed job starts AdamW's moments afresh.
    """

    STATE = "state.json"

    def __init__(self, folder: str, every: int) -> None:
        self.folder = Path(folder) if folder else None
        self.every = every if self.folder is not None else 0
        self.last = 0

    def state(self) -> CheckpointState | None:
        """The complete checkpoint's state, if there is one."""
        if self.folder is None:
            return None
        try:
            state = msgspec.json.decode((self.folder / self.STATE).read_bytes(), type=CheckpointState)
        except (OSError, msgspec.ValidationError, msgspec.DecodeError):
            return None
        return state if (self.folder / state.weights).is_file() else None

    def load(self, expected: str) -> tuple[CheckpointState, Path] | None:
        """The checkpoint, if one is there for this job as configured (its fingerprint)."""
        state = self.state()
        if self.folder is None or state is None or state.fingerprint != expected:
            return None
        weights = self.folder / state.weights
        self.last = state.step
        return state, weights

    def due(self, step: int) -> bool:
        return self.every > 0 and step - self.last >= self.every

    def save(self, session: TrainingSession, state: CheckpointState) -> None:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = self.folder / f"weights-{state.step}.gguf"
        partial = weights.with_name(weights.name + ".partial")
        session.save(partial)
        os.replace(partial, weights)
        state.weights = weights.name
        partial_state = self.folder / (self.STATE + ".partial")
        partial_state.write_bytes(msgspec.json.encode(state))
        os.replace(partial_state, self.folder / self.STATE)
        for old in self.folder.glob("weights-*.gguf*"):
            if old.name != weights.name:
                old.unlink(missing_ok=True)
        self.last = state.step


def train(config: TrainConfig, report: Callable[[Event], None], cancelled: Callable[[], bool]) -> Finished:
    """Run the job (see the module docstring), reporting events; returns the Finished event it reported.

    With a checkpoint for this job in ``config.checkpoint_dir`` (:class:`Checkpoints`), training
    continues from it. Raises TrainingRefused before any training, TrainingCancelled when
    ``cancelled()`` is true between chunks, RuntimeError when llama.cpp fails.
    """
    from locopilot.training.export import to_f32

    config.check()
    started = time.monotonic()
    stages: dict[str, float] = {}
    stage_cpu: dict[str, float] = {}
    mark, cpu_mark = started, cpu_seconds()

    def stage(name: str) -> None:
        nonlocal mark, cpu_mark
        now, cpu = time.monotonic(), cpu_seconds()
        stages[name] = round(now - mark, 2)
        stage_cpu[name] = round(cpu - cpu_mark, 2)
        mark, cpu_mark = now, cpu

    header = read_header(Path(config.base_path))
    encoded = encoded_examples(config)
    prompts = spot_prompts(config)
    rng = random.Random(config.seed)
    rng.shuffle(encoded)
    # Held out by example, so no validation token is ever in a training window.
    n_val = int(len(encoded) * config.validation_split)
    validation = [(e.tokens, e.trained) for e in encoded[:n_val]]
    own = [(e.tokens, e.trained) for e in encoded[n_val:]]
    mixed = list(own)
    if config.anchors == "builtin":
        mixed += anchor_examples(config)
        rng.shuffle(mixed)
    # Labelled with the data until the base has labelled what is not trained (below).
    training = windows([(tokens, tokens) for tokens, _ in mixed], config.context)
    # Sized by the dataset's own windows: the anchors are not what the job learns.
    own_windows = len(windows([(tokens, tokens) for tokens, _ in own], config.context))
    config, auto_rate, chosen = resolve(config, header, own_windows)
    assert isinstance(config.epochs, int) and isinstance(config.learning_rate, float) and isinstance(config.layers, int)
    estimate = check_resources(header, config)
    steps = len(training) * config.epochs
    report(
        Started(
            examples=len(encoded),
            validation_examples=n_val,
            tokens=sum(len(example.tokens) for example in encoded),
            windows=len(training),
            steps=steps,
            trained_layers=estimate.trained_layers,
            trained_weights=estimate.trained_weights,
            estimate_bytes=estimate.total,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            layers=config.layers,
            auto_learning_rate=auto_rate,
            chosen=chosen,
            lora_rank=config.lora_rank if isinstance(config.lora_rank, int) else None,
            dataset_windows=own_windows,
        )
    )
    checkpoints = Checkpoints(config.checkpoint_dir, config.checkpoint_steps)
    expected = fingerprint(config, training, validation)
    resumed = checkpoints.load(expected)
    with tempfile.TemporaryDirectory(prefix="locopilot-train-", dir=config.work_dir) as work:
        f32 = Path(work) / "base-f32.gguf"
        trained = Path(work) / "trained-f32.gguf"
        to_f32(Path(config.base_path), f32, threads=config.threads)
        stage("prepare")
        start = f32 if resumed is None else resumed[1]
        with TrainingSession(config, config.learning_rate, start, estimate.trained_layers, f32) as session:
            if resumed is None:
                t = time.monotonic()
                spot_before = session.generate([(tokens, MAX_TOKENS) for tokens in prompts])
                spot_seconds = time.monotonic() - t
                stage("spot_check_base")
                # Before anything is trained: positions not trained take the base's own predictions.
                loss_before, labelled = session.evaluate(mixed, predict=True)
                training = windows(list(zip((tokens for tokens, _ in mixed), labelled, strict=True)), config.context)
                state = CheckpointState(
                    step=0,
                    weights="",
                    fingerprint=expected,
                    train_seconds=0.0,
                    loss_before=loss_before or 0.0,
                    validation_loss_before=session.evaluate(validation)[0] if validation else None,
                    labels=[window.labels for window in training],
                    spot_before=spot_before,
                    spot_seconds=spot_seconds,
                )
            else:
                state = resumed[0]
                for window, labels in zip(training, state.labels, strict=True):
                    window.labels = labels
                report(Checkpointed(step=state.step, steps=steps, seconds=0.0, resumed=True))
            stage("relabel")
            _loop(session, config, training, steps, state, checkpoints, rng, report, cancelled, started)
            stage("train")
            loss_after = session.evaluate(own)[0] or 0.0
            val_after = session.evaluate(validation)[0] if validation else None
            stage("loss_after")
            check = None
            if prompts:
                held_out = [RecallItem(e.question, e.prompt, e.answer) for e in encoded[:n_val]]
                check = _spot_check(session, prompts, state, held_out)
                stage("spot_check")
            session.save(trained)
        publish(config, f32, trained, stage)
    finished = Finished(
        output_path=config.output_path,
        train_loss_before=state.loss_before,
        train_loss_after=loss_after,
        validation_loss_before=state.validation_loss_before,
        validation_loss_after=val_after,
        tokens_per_s=steps * config.context / state.train_seconds if state.train_seconds else 0.0,
        trained_tokens=steps * config.context,
        seconds=time.monotonic() - started,
        peak_rss_bytes=peak_rss_bytes(),
        spot_check=check,
        cpu_seconds=cpu_seconds(),
        stage_seconds=stages,
        stage_cpu_seconds=stage_cpu,
    )
    report(finished)
    return finished


def _spot_check(
    session: TrainingSession, prompts: list[list[int]], state: CheckpointState, held_out: Sequence[RecallItem]
) -> SpotCheck:
    """The trained weights' answers to the spot check and to the first :data:`MAX_RECALL`
    held-out examples, checked against the base's (``state.spot_before``)."""
    started = time.monotonic()
    items = held_out[:MAX_RECALL]
    after = session.generate(
        [(tokens, MAX_TOKENS) for tokens in prompts] + [(item.prompt, RECALL_TOKENS) for item in items]
    )
    seconds = state.spot_seconds + time.monotonic() - started
    replies = list(zip(items, after[len(prompts) :], strict=True))
    return spot_check(state.spot_before, after[: len(prompts)], seconds, replies)


def _loop(
    session: TrainingSession,
    config: TrainConfig,
    training: list[Window],
    steps: int,
    state: CheckpointState,
    checkpoints: Checkpoints,
    rng: random.Random,
    report: Callable[[Event], None],
    cancelled: Callable[[], bool],
    started: float,
) -> None:
    """The epochs, chunk by chunk from ``state.step`` (a resumed job replays the shuffles
    before it, so it sees the windows in the same order), checkpointing as due."""
    assert isinstance(config.epochs, int) and isinstance(config.learning_rate, float)
    step = 0
    for epoch in range(config.epochs):
        order = list(training)
        rng.shuffle(order)
        for i in range(0, len(order), config.chunk_windows):
            chunk = order[i : i + config.chunk_windows]
            if step + len(chunk) <= state.step:
                step += len(chunk)
                continue
            if cancelled():
                raise TrainingCancelled
            # Linear decay to a tenth of the learning rate over the job.
            session.set_learning_rate(config.learning_rate * (1 - 0.9 * step / max(1, steps)))
            t = time.monotonic()
            loss = session.step(chunk)
            session.project(step + len(chunk))
            state.train_seconds += time.monotonic() - t
            step += len(chunk)
            report(
                Progress(
                    epoch=epoch + 1,
                    step=step,
                    steps=steps,
                    loss=loss,
                    tokens_per_s=step * config.context / state.train_seconds if state.train_seconds else 0.0,
                    elapsed_s=time.monotonic() - started,
                )
            )
            if checkpoints.due(step) and step < steps:
                t = time.monotonic()
                state.step = step
                checkpoints.save(session, state)
                report(Checkpointed(step=step, steps=steps, seconds=time.monotonic() - t))
