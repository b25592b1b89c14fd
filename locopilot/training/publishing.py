"""Where a training result goes: the eval gate's verdict, and the move into the models folder
or the held folder. Server jobs (:mod:`locopilot.training.jobs`) and ``locopilot train`` on
this machine (:mod:`locopilot.cli.train`) both publish through it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from locopilot.training.trainer import Finished


def gate(thresholds: dict[str, Any], finished: Finished) -> list[str]:
    """Why the result must not be published, by the job's thresholds; empty when it may be.

    - ``min_recall``: the share of held-out examples the result answers (the recall check,
      :mod:`locopilot.training.spotcheck`) must be at least this;
    - ``max_validation_loss``: the validation loss after training (the held-out answers' tokens
      only, :class:`~locopilot.training.trainer.Finished`) at most this;
    - ``max_spot_check_lost``: at most this many of the spot check's general answers lost.

    A threshold whose measure the job did not take (no held-out examples, spot check off) holds
    the result back too: the gate cannot say it passed.
    """
    reasons = []
    check = finished.spot_check
    if (least := thresholds.get("min_recall")) is not None:
        recall = check.recall if check is not None else None
        if recall is None:
            reasons.append(f"min_recall is {least:g} but the job had no held-out examples to check recall on")
        elif recall.fraction < least:
            reasons.append(
                f"recall {recall.recalled}/{recall.asked} ({recall.fraction:.2f}) is below min_recall {least:g}"
            )
    if (most := thresholds.get("max_validation_loss")) is not None:
        loss = finished.validation_loss_after
        if loss is None:
            reasons.append(f"max_validation_loss is {most:g} but the job had no validation examples")
        elif loss > most:
            reasons.append(f"validation loss {loss:.4f} is above max_validation_loss {most:g}")
    if (lost := thresholds.get("max_spot_check_lost")) is not None:
        if check is None:
            reasons.append(f"max_spot_check_lost is {lost} but the job ran no spot check")
        elif check.lost > lost:
            reasons.append(
                f"the spot check lost {check.lost} of {check.base_correct} answers, above max_spot_check_lost {lost}"
            )
    return reasons


def move_into(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, or copy it (to a hidden name first) across file systems."""
    try:
        os.replace(source, target)
    except OSError:
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        source.unlink(missing_ok=True)
