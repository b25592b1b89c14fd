"""The places that lean on dependencies' private internals (locopilot.dependency_internals) hold and are pinned."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from locopilot import dependency_internals


def test_the_internals_locopilot_leans_on_are_still_there() -> None:
    assert dependency_internals.problems() == []


def test_each_is_pinned_below_the_release_not_checked() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    requirements = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0]: r for r in project["project"]["dependencies"]}
    for name, bound in dependency_internals.PINS.items():
        assert f"<{bound}" in requirements[name], requirements[name]


def test_a_release_past_a_pin_is_reported() -> None:
    """The version check is real: an installed version at the bound is a problem."""
    assert not dependency_internals._below("2.26.0", "2.26")
    assert dependency_internals._below("2.25.9", "2.26")
    assert not dependency_internals._below("0.29", "0.29")
