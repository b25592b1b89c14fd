"""Leftovers of the one-file executable: unpacked folders nobody uses any more.

The frozen ``locopilot`` is a PyInstaller one-file bundle. Its bootloader (patched:
build/pyinstaller-bootloader.patch) unpacks it (about 110 MB) into
``$TMPDIR/_MEI<pid><random>`` and, once complete, keeps it as
``locopilot-<uid>-<key>`` beside it, where the key is a hash of every unpacked file;
later starts with the same key check that copy and use it instead of unpacking again.
Three kinds of folder are left behind, and ``serve`` calls :func:`remove_leftovers`
at start to remove them from the folder its own copy is in:

- ``_MEI…`` folders of bootloaders killed with SIGKILL (the OOM killer, a stop
  timeout, ``kill -9``) before they kept or removed them: named as PyInstaller names
  them (the unpacking process's id, eight hex digits, then six random characters,
  since PyInstaller 6.22.1), holding a bundled ``llama_cpp``, whose unpacking process
  is gone;
- kept copies of other builds (another key), unused for :data:`STALE_AFTER`: the
  bootloader touches a copy each time it uses one;
- ``….stale-<pid>`` folders, copies that failed their check, renamed to be removed,
  whose remover is gone.

Only this user's folders, and none that a live process maps (a program whose
bootloader alone was killed still runs from its folder, and so do its runners).
Linux only: elsewhere nothing is removed.

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
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("locopilot.bundle")

#: ``_MEI`` + the unpacking process id as eight hex digits + mkdtemp's six characters.
UNPACKED = re.compile(r"^_MEI(?P<pid>[0-9a-f]{8})[A-Za-z0-9]{6}$")
#: A kept copy: ``locopilot-`` + the user id + the first 32 hex digits of its key; a copy
#: being removed after a failed check ends in ``.stale-`` + the remover's process id.
KEPT = re.compile(r"^locopilot-(?P<uid>[0-9]+)-[0-9a-f]{32}(?:\.stale-(?P<pid>[0-9]+))?$")
#: A kept copy of another build that no start has used for this long is removed.
STALE_AFTER = 3600.0


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
    now: float | None = None,
) -> list[Path]:
    """The unpacked folders in ``parent`` that :func:`remove_leftovers` would remove."""
    uid = os.getuid()
    now = time.time() if now is None else now
    candidates = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for folder in entries:
        if folder == own:
            continue
        try:
            info = folder.lstat()
        except OSError:
            continue
        if not folder.is_dir() or folder.is_symlink() or info.st_uid != uid:
            continue
        if _left_behind(folder, info.st_mtime, uid=uid, alive=alive, now=now):
            candidates.append(folder)
    if not candidates:
        return []
    in_use = set()
    for path in mapped():
        for folder in candidates:
            if path.startswith(f"{folder}/"):
                in_use.add(folder)
    return [folder for folder in candidates if folder not in in_use]


def _left_behind(folder: Path, modified: float, *, uid: int, alive: Callable[[int], bool], now: float) -> bool:
    """Whether ``folder`` (this user's) is one of the three kinds in the module docstring."""
    if match := UNPACKED.match(folder.name):
        return (folder / "llama_cpp").is_dir() and not alive(int(match["pid"], 16))
    if (match := KEPT.match(folder.name)) and int(match["uid"]) == uid:
        if match["pid"] is not None:
            return not alive(int(match["pid"]))
        return now - modified > STALE_AFTER
    return False


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
        log.info("removed %s, an unpacked folder no locopilot uses", folder)
        removed.append(folder)
    return removed
