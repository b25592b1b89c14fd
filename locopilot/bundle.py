"""Leftovers of the one-file executable: unpacked folders of killed processes.

The frozen ``locopilot`` is a PyInstaller one-file bundle. Its bootloader unpacks
it (about 110 MB) into ``$TMPDIR/_MEI<pid><random>`` on every start and removes
the folder when the program ends, but not when the bootloader is killed with
SIGKILL (the OOM killer, a stop timeout, ``kill -9``). ``serve`` calls
:func:`remove_leftovers` at start, which removes such folders next to its own:
owned by this user, named as PyInstaller names them (the unpacking process's id,
eight hex digits, then six random characters, since PyInstaller 6.22.1), holding
a bundled ``llama_cpp``, whose unpacking process is gone, and which no live
process maps (a program whose bootloader alone was killed still runs from its
folder, and so do its runners). Linux only: elsewhere nothing is removed.

A process in another PID namespace sharing this temporary folder (a container
with the same ``/tmp``) is invisible here; such a setup should give each its own
``TMPDIR``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("locopilot.bundle")

#: ``_MEI`` + the unpacking process id as eight hex digits + mkdtemp's six characters.
UNPACKED = re.compile(r"^_MEI(?P<pid>[0-9a-f]{8})[A-Za-z0-9]{6}$")


def own_folder() -> Path | None:
    """The folder this process was unpacked into; None when not running from a one-file bundle."""
    folder = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or folder is None:
        return None
    return Path(folder)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def mapped_files(proc: Path = Path("/proc")) -> Iterable[str]:
    """Every file path mapped by a process this user may inspect (``/proc/PID/maps``)."""
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                yield fields[5]


def leftovers(
    parent: Path,
    *,
    own: Path | None,
    alive: Callable[[int], bool] = pid_alive,
    mapped: Callable[[], Iterable[str]] = mapped_files,
) -> list[Path]:
    """The unpacked folders in ``parent`` that :func:`remove_leftovers` would remove."""
    uid = os.getuid()
    candidates = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for folder in entries:
        match = UNPACKED.match(folder.name)
        if not match or folder == own:
            continue
        try:
            info = folder.lstat()
        except OSError:
            continue
        if not folder.is_dir() or folder.is_symlink() or info.st_uid != uid:
            continue
        if not (folder / "llama_cpp").is_dir() or alive(int(match["pid"], 16)):
            continue
        candidates.append(folder)
    if not candidates:
        return []
    in_use = set()
    for path in mapped():
        for folder in candidates:
            if path.startswith(f"{folder}/"):
                in_use.add(folder)
    return [folder for folder in candidates if folder not in in_use]


def remove_leftovers() -> list[Path]:
    """Remove the leftovers next to this process's own unpacked folder; returns what was removed.

    Does nothing outside a one-file bundle or off Linux. Never raises: a folder that
    cannot be removed is logged and skipped.
    """
    own = own_folder()
    if own is None or not sys.platform.startswith("linux"):
        return []
    removed = []
    for folder in leftovers(own.parent, own=own):
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            log.warning("could not remove the leftover unpacked folder %s: %s", folder, exc)
            continue
        log.info("removed %s, left behind by a killed locopilot", folder)
        removed.append(folder)
    return removed
