"""The settings file for a service: every ``LOCOPILOT_*`` setting with its default and what it does.

:func:`example` is ``systemd/locopilot.env.example``; :func:`installed` is what
``locopilot service install`` writes when no env file exists yet (the same text
with a generated admin key set). :func:`parse` reads such a file back (for
launchd, which has no ``EnvironmentFile=``).
"""

from __future__ import annotations

import textwrap

from locopilot.settings import describe

WIDTH = 79

HEADER = """\
# locopilot settings, one VARIABLE=value a line; lines starting with # are
# comments. The commented values are the defaults: uncomment what you change.
# `locopilot service install` writes it when it is missing, mode 0600:
# /etc/locopilot/locopilot.env for the system service (systemd reads it as
# root before starting it), ~/.config/locopilot/locopilot.env with --user.
# `locopilot config` prints the effective settings. A misspelled LOCOPILOT_*
# variable stops the server with a message naming it.
# Generated from locopilot/settings.py (`just docs`), like the README's table.
"""


def _comment(text: str) -> list[str]:
    plain = text.replace("`", "")  # the descriptions are Markdown for the README
    return textwrap.wrap(plain, WIDTH - 2, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def example(values: dict[str, str] | None = None) -> str:
    """Every setting as a commented ``#VARIABLE=default`` under its description.

    A variable named in ``values`` is written uncommented with that value instead.
    """
    values = values or {}
    blocks = [HEADER]
    for info in describe():
        allowed = info.type_name.replace("…", "..")
        shown = f" ({allowed})" if allowed not in ("text", "path") else ""
        lines = _comment(info.description + shown)
        if info.variable in values:
            lines.append(f"{info.variable}={values[info.variable]}")
        else:
            lines.append(f"#{info.variable}={info.default}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def installed(admin_key: str) -> str:
    """The env file ``service install`` creates: the example with ``LOCOPILOT_ADMIN_KEY`` set."""
    return example({"LOCOPILOT_ADMIN_KEY": admin_key})


def parse(text: str) -> dict[str, str]:
    """The assignments in an env file, in systemd's ``EnvironmentFile=`` syntax (the common subset).

    Blank lines and ``#``/``;`` comments are skipped; a value wrapped in matching
    single or double quotes loses them. Raises ValueError naming a line that is
    not ``NAME=value``.
    """
    result: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier():
            raise ValueError(f"line {number}: expected NAME=value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        result[name] = value
    return result
