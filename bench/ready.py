"""Waiting for a server a benchmark started: the one "until it answers 200" loop of bench/.

``wait_ready(process, url)`` polls ``GET url`` (no proxy from the environment) until it
answers 200, and raises :class:`StartError` when the process exits first or the time is up;
the message ends with the tail of the server's log when one is given. Stopping the process
is the caller's (each benchmark starts it in a ``with`` or ``try`` that does).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import httpx


class StartError(Exception):
    """A server that did not start or did not answer its check requests."""


def wait_ready(
    process: subprocess.Popen[bytes],
    url: str,
    seconds: float = 120,
    log: Path | None = None,
    interval: float = 0.2,
) -> None:
    """Return once ``GET url`` answers 200.

    Raises:
        StartError: ``process`` exited, or ``url`` did not answer 200 within ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(interval)
    code = process.poll()
    why = f"exited with status {code}" if code is not None else f"{url} did not answer 200 within {seconds:.0f} s"
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise StartError(f"{why}; its output ends with:\n{tail}" if tail else why)
