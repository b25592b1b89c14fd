"""``auto`` hyperparameters: the trained layers, learning rate and epochs a job gets unless it names them.

OpenAI's fine-tuning API takes ``"auto"`` for ``n_epochs``, ``learning_rate_multiplier`` and
``batch_size``, and that is its default; locopilot's trainer does the same, by this rule
(measured with ``bench/finetune_recall.py`` on SmolLM2-135M-Instruct: 40 examples teaching 8
invented facts, asked afterwards in phrasings no example had; the README's fine-tuning section
has the table):

- **layers** (:func:`layers`): the last half of the blocks for a model up to
  :data:`SMALL_MODEL` weights, the last quarter beyond it, never fewer than :data:`MIN_LAYERS`
  (every block of a model that has no more). Each trained block costs its backward pass and
  12 bytes of optimizer state per weight. On SmolLM2 (30 blocks), 15 blocks at 5e-4 recalled
  14 of 16 held-out questions where 6 blocks at 1e-3 recalled 9, and the last 4 at 1e-5 (the
  old default) none.
- **learning rate** (:func:`learning_rate`): :data:`REFERENCE_LEARNING_RATE` for a model of
  :data:`REFERENCE_WEIGHTS`, scaled by the square root of the size ratio (a larger model takes
  a smaller rate), within [:data:`MIN_LEARNING_RATE`, :data:`MAX_AUTO_LEARNING_RATE`].
  ``learning_rate_multiplier`` multiplies this value. On SmolLM2, 1e-4 recalled 12 of 16 and
  lost 4 of the spot check's 6 answers; 5e-4 and 1e-3 lost all 6. Every rate that learned the
  facts also bent general answers towards them ("What language is spoken in Spain?" got the
  invented language) while the loss covered every token of an example. Now only the answers'
  tokens are trained (the other positions are labelled with the base's own predictions, as
  llama.cpp's optimizer has no mask), and anchor examples labelled the same way
  (:mod:`locopilot.training.anchors`) are mixed in; the README's table has what each did.
  With them, 1e-4 in 3 passes recalled 13 of 16 and lost 1 answer; the rate is now 1.5e-4
  in 2 passes (fewer steps, for time): 3e-4 in 3 passes of windows that start where
  examples start recalled 13 and lost all 6, 1.5e-4 there 11 and lost none.
- **epochs** (:func:`epochs`): enough passes over the dataset's own windows for about
  :data:`TARGET_STEPS` optimizer steps on them (one step is one window of ``context`` tokens,
  windows overlap by half), within [1, :data:`MAX_EPOCHS`]: a small dataset gets several
  passes, a large one a single pass. The anchors' windows are trained beside them in every
  pass but not counted: they are not what the job learns. The bench's 36 training examples
  fill 15 windows (23 with the anchors): 2 passes, 46 steps, where 3 passes (69 steps at
  about 5 CPU seconds each) put the job over 3 minutes of the 2-core machine.
- ``batch_size``: always 1 window per step; ``auto`` and 1 are the same.
- **LoRA rank** (:func:`lora_rank`, for a job that publishes an adapter): :data:`LORA_RANK`
  for a model up to :data:`SMALL_MODEL` weights, twice that beyond. Training keeps each
  trained matrix's change within that rank as it goes
  (:meth:`locopilot.training.session.TrainingSession.project`), and the adapter is the final
  change; not yet measured against recall on the bench's facts (bench/finetune_recall.py can,
  with ``lora_rank``).

The job reports the values chosen (OpenAI's job object, locopilot's ``hyperparameters``).
"""

from __future__ import annotations

import math

from locopilot.models.gguf import GGUFHeader

#: Models up to this many weights train half their blocks; larger ones a quarter.
SMALL_MODEL = 1_000_000_000
MIN_LAYERS = 4
#: The learning rate measured on the reference model (SmolLM2-135M); others scale by sqrt(size ratio).
REFERENCE_LEARNING_RATE = 1.5e-4
REFERENCE_WEIGHTS = 135_000_000
MIN_LEARNING_RATE = 1e-5
MAX_AUTO_LEARNING_RATE = 1e-3
#: Optimizer steps on the dataset's own windows a job aims at, and the passes allowed to reach them.
TARGET_STEPS = 28
MAX_EPOCHS = 10
LORA_RANK = 16


def block_count(header: GGUFHeader) -> int:
    value = header.metadata.get(f"{header.architecture or ''}.block_count")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def layers(header: GGUFHeader) -> int:
    """The last N blocks to train (see the module docstring)."""
    n_layer = block_count(header)
    share = 2 if header.parameter_count <= SMALL_MODEL else 4
    return min(n_layer, max(MIN_LAYERS, math.ceil(n_layer / share)))


def learning_rate(header: GGUFHeader) -> float:
    """AdamW's learning rate for this model (see the module docstring)."""
    weights = max(1, header.parameter_count)
    rate = REFERENCE_LEARNING_RATE * math.sqrt(REFERENCE_WEIGHTS / weights)
    return float(min(MAX_AUTO_LEARNING_RATE, max(MIN_LEARNING_RATE, rate)))


def epochs(windows: int) -> int:
    """Passes over a dataset that fills ``windows`` training windows, anchors not counted (see the module docstring)."""
    return min(MAX_EPOCHS, max(1, math.ceil(TARGET_STEPS / max(1, windows))))


def lora_rank(header: GGUFHeader) -> int:
    """The rank of an adapter extracted from a job's trained weights (see the module docstring)."""
    return LORA_RANK if header.parameter_count <= SMALL_MODEL else 2 * LORA_RANK
