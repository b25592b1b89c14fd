"""External training frameworks: Unsloth, Axolotl, MLX-LM (see :mod:`.base` for the contract).

:data:`FRAMEWORKS` maps each name (``locopilot train --framework NAME``) to its adapter class.
"""

from __future__ import annotations

import platform
import sys

from locopilot.training.adapters.axolotl import Axolotl
from locopilot.training.adapters.base import TrainingFramework
from locopilot.training.adapters.mlx_lm import MLXLM
from locopilot.training.adapters.unsloth import Unsloth

FRAMEWORKS: dict[str, type[TrainingFramework]] = {"unsloth": Unsloth, "axolotl": Axolotl, "mlx": MLXLM}


def preference(system: str | None = None, machine: str | None = None) -> list[str]:
    """Framework names, the one to prefer on this machine first: MLX on Apple silicon, else the GPU ones."""
    system = system or sys.platform
    machine = machine or platform.machine()
    if system == "darwin" and machine == "arm64":
        return ["mlx", "axolotl", "unsloth"]
    return ["unsloth", "axolotl", "mlx"]
