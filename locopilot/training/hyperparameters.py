"""The one schema of a training job's hyperparameters: :class:`Hyperparameters`.

Every way a job comes in takes these fields with these limits, and the limits are on the
types (``msgspec.Meta``), so decoding a request body, a job file or a flag checks them:

- the built-in trainer's :class:`~locopilot.training.trainer.TrainConfig` and the job
  service's :class:`~locopilot.training.jobs.JobSpec` (locopilot's job API takes it as its
  body) extend :class:`Hyperparameters`; so does the job file's
  :class:`~locopilot.training.jobfile.TrainOptions`;
- OpenAI's ``hyperparameters`` object (:mod:`locopilot.api.training`) has its own names for
  three of them (``n_epochs``, ``learning_rate_multiplier``, ``batch_size``) over these types;
- the flags of ``locopilot train`` and ``locopilot jobs submit`` are generated from the
  fields (:mod:`locopilot.cli.options`), their help from the descriptions here.

``auto`` (``epochs``, ``learning_rate``, ``layers``, ``lora_rank``) is chosen when the job
starts (:mod:`locopilot.training.auto`). A Struct built in Python rather than decoded is not
checked until :meth:`Hyperparameters.check`, which also checks the one rule across fields.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import msgspec
from msgspec import Meta

Auto = Literal["auto"]
DEFAULT_CONTEXT = 256
#: llama.cpp pads a context to a multiple of 256; a training window is exactly one context.
CONTEXT_STEP = 256
#: The highest learning rate a job may run with, after ``learning_rate_multiplier``.
MAX_LEARNING_RATE = 1e-2
#: The auto rule's rate is at most 1e-3 (locopilot.training.auto), so at most 1e-2 after this.
MAX_MULTIPLIER = 10.0
MAX_LORA_RANK = 256
#: What ``auto`` (or nothing) means for an external framework (LoRA): its usual values.
DEFAULT_LORA_EPOCHS = 1
DEFAULT_LORA_LEARNING_RATE = 1e-4
DEFAULT_LORA_RANK = 8

Epochs = Annotated[int, Meta(ge=1, le=100, description="Passes over the dataset (OpenAI's `n_epochs`).")]
LearningRate = Annotated[
    float, Meta(gt=0, le=MAX_LEARNING_RATE, description="The optimizer's learning rate (times the multiplier).")
]
Multiplier = Annotated[
    float,
    Meta(gt=0, le=MAX_MULTIPLIER, description="Multiplies the learning rate, chosen or given (OpenAI's too)."),
]
Optimizer = Annotated[Literal["adamw", "sgd"], Meta(description="The optimizer.")]
WeightDecay = Annotated[float, Meta(ge=0, le=1, description="The optimizer's weight decay.")]
Layers = Annotated[int, Meta(ge=0, le=1024, description="Train the last N blocks; 0: every block.")]
Context = Annotated[
    int,
    Meta(
        ge=CONTEXT_STEP,
        le=1 << 20,
        multiple_of=CONTEXT_STEP,
        description=f"Training window in tokens, a multiple of {CONTEXT_STEP}.",
    ),
]
ValidationSplit = Annotated[
    float, Meta(ge=0, lt=0.5, description="Share of the examples held out for a validation loss.")
]
OutputType = Literal["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]
Output = Annotated[OutputType, Meta(description="The trained model's tensor type.")]
Seed = Annotated[int, Meta(ge=0, le=2**31 - 1, description="Shuffles the examples and the held-out share.")]
LoraRank = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_LORA_RANK,
        description="Publish a LoRA adapter of this rank, served beside the base, instead of a whole model.",
    ),
]
Loss = Annotated[
    Literal["answers", "all"],
    Meta(description="The tokens trained: the assistant's answers only, or all (prompts and template too)."),
]
Anchors = Annotated[
    Literal["builtin", "none"],
    Meta(description="Mix in general questions labelled with the base's own predictions, to keep its answers."),
]
DEFAULT_CHECKPOINT_STEPS = 20
CheckpointSteps = Annotated[
    int, Meta(ge=0, le=1_000_000, description="Save the weights every N steps, to resume after a restart; 0: never.")
]
MinRecall = Annotated[
    float, Meta(ge=0, le=1, description="Eval gate: publish only if this share of held-out answers is recalled.")
]
MaxValidationLoss = Annotated[
    float, Meta(gt=0, le=100, description="Eval gate: publish only if the validation loss is at most this.")
]
MaxSpotCheckLost = Annotated[
    int, Meta(ge=0, le=100, description="Eval gate: publish only if at most this many spot-check answers were lost.")
]
# What a job names besides its hyperparameters.
ModelName = Annotated[str, Meta(min_length=1, max_length=200)]
FileId = Annotated[str, Meta(min_length=1, max_length=128)]
RemoteName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
#: Who trains: ``builtin`` (llama.cpp, on the GGUF itself), or an external framework that trains LoRA
#: on the model in Hugging Face form (:mod:`locopilot.training.adapters`).
Framework = Literal["builtin", "unsloth", "axolotl", "mlx"]


class HyperparameterInvalid(ValueError):
    """A value out of its range; ``field`` names it (None: the message's path does)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Hyperparameters(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a training job's result depends on besides its base model and dataset."""

    epochs: Epochs | Auto = "auto"
    learning_rate: LearningRate | Auto = "auto"
    learning_rate_multiplier: Multiplier = 1.0
    optimizer: Optimizer = "adamw"
    weight_decay: WeightDecay = 0.0
    layers: Layers | Auto = "auto"
    context: Context = DEFAULT_CONTEXT
    validation_split: ValidationSplit = 0.1
    output_type: Output = "q8_0"
    seed: Seed = 0
    lora_rank: LoraRank | Auto | None = None
    """None: the whole model (an external framework: its default rank, 8)."""
    loss: Loss = "answers"
    anchors: Anchors = "builtin"
    checkpoint_steps: CheckpointSteps = DEFAULT_CHECKPOINT_STEPS
    # The eval gate (locopilot.training.publishing.gate): a result that misses one is kept, not published.
    min_recall: MinRecall | None = None
    max_validation_loss: MaxValidationLoss | None = None
    max_spot_check_lost: MaxSpotCheckLost | None = None

    def check(self) -> None:
        """Raises HyperparameterInvalid for a value out of its range (a Struct built in Python is
        not checked until now) or a learning rate above MAX_LEARNING_RATE after the multiplier."""
        try:
            msgspec.convert(msgspec.structs.asdict(self), type(self))
        except msgspec.ValidationError as exc:
            raise HyperparameterInvalid(str(exc)) from exc
        if isinstance(self.learning_rate, float | int):
            rate = self.learning_rate * self.learning_rate_multiplier
            if rate > MAX_LEARNING_RATE:
                raise HyperparameterInvalid(
                    f"the learning rate times learning_rate_multiplier must be at most {MAX_LEARNING_RATE:g}, "
                    f"not {rate:g}",
                    "learning_rate_multiplier",
                )

    def hyperparameters(self) -> Hyperparameters:
        """Only the fields of :class:`Hyperparameters` (of a Struct that extends it)."""
        return Hyperparameters(**{name: getattr(self, name) for name in Hyperparameters.__struct_fields__})


FIELDS = Hyperparameters.__struct_fields__
#: The eval gate's thresholds (locopilot.training.publishing.gate).
GATE_THRESHOLDS = ("min_recall", "max_validation_loss", "max_spot_check_lost")
#: The options an external framework has no counterpart for: a job that names a framework and sets
#: one of them is refused (``locopilot train`` and the server alike).
BUILTIN_ONLY = ("output_type", "weight_decay", "loss", "anchors", "checkpoint_steps", *GATE_THRESHOLDS)


def builtin_only(hyper: Hyperparameters) -> list[str]:
    """Those of :data:`BUILTIN_ONLY` that ``hyper`` sets to other than their defaults."""
    default = Hyperparameters()
    return [name for name in BUILTIN_ONLY if getattr(hyper, name) != getattr(default, name)]


class LoraValues(NamedTuple):
    """What an external framework trains with (:func:`lora_values`)."""

    epochs: int
    learning_rate: float
    layers: int
    lora_rank: int


def lora_values(hyper: Hyperparameters) -> LoraValues:
    """``hyper`` for an external framework: ``auto`` (and no rank) as LoRA's usual values
    (``DEFAULT_LORA_*``; every block), the learning rate times the multiplier."""
    rate = DEFAULT_LORA_LEARNING_RATE if hyper.learning_rate == "auto" else hyper.learning_rate
    return LoraValues(
        epochs=DEFAULT_LORA_EPOCHS if hyper.epochs == "auto" else hyper.epochs,
        learning_rate=rate * hyper.learning_rate_multiplier,
        layers=0 if hyper.layers == "auto" else hyper.layers,
        lora_rank=hyper.lora_rank if isinstance(hyper.lora_rank, int) else DEFAULT_LORA_RANK,
    )
