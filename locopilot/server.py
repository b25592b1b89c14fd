"""Run the app under granian: one worker process, graceful drain on SIGTERM/SIGINT.

granian's main process owns the signals: on SIGTERM it SIGTERMs its worker, which stops
accepting and waits for the requests in flight, then runs the app's lifespan shutdown;
the main process SIGKILLs a worker still alive ``workers_kill_timeout`` seconds later. The
app inside the worker hears nothing until the last request has ended, so it could neither
report not-ready nor cut off a stream at the end of the grace. :class:`DrainingServer`
therefore also sends the worker :data:`~locopilot.gateway.shutdown.DRAIN_SIGNAL` (the app's
side is :mod:`locopilot.gateway.shutdown`), gives the worker the grace plus
:data:`STOP_SECONDS` to stop runners and close the database, and exits at once on a second
signal. SIGHUP is passed on to the worker, where the app reloads its upstream settings
(granian itself would restart the worker).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from granian.server.mp import MPServer

from locopilot.logformat import configure_logging, logging_config, resolve_format
from locopilot.settings import Settings, load_settings

log = logging.getLogger(__name__)

#: After the grace: time for the lifespan shutdown (each runner gets 5 s to exit) and the WAL checkpoint.
STOP_SECONDS = 15


def app_from_environment(_target: str = "") -> Any:
    """granian's loader, called in the worker process: settings → app.

    The worker reads the same environment the parent already validated.
    granian imports a string target relative to the working directory first
    (a stray folder there could shadow ours), so it gets this explicit loader.
    """
    from locopilot.app import create_app
    from locopilot.gateway.shutdown import DRAIN_SIGNAL

    # Until the app listens for them, a drain or reload signal must not end the worker (their default action).
    signal.signal(DRAIN_SIGNAL, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = load_settings(os.environ)
    configure_logging(settings.log_level, resolve_format(settings.log_format))
    return create_app(settings)


class DrainingServer(MPServer):
    """granian's process-based server, with locopilot's stop (see the module docstring).

    It leans on granian's internals: see :mod:`locopilot.dependency_internals`.
    """

    stopping = False

    def signal_handler_interrupt(self, *args: Any, **kwargs: Any) -> None:
        # Our own flag, set before anything else: granian sets interrupt_signal only in
        # super(), and a second signal can run this handler again (nested) before that,
        # e.g. while the import below runs, and would then pass for a first one.
        if self.stopping:
            log.warning("second stop signal: exiting now; requests in flight are cut off")
            for worker in self.wrks:
                # The worker's runners see their stdin close and exit by themselves.
                worker.kill()  # type: ignore[no-untyped-call]
            os._exit(1)
        self.stopping = True
        from locopilot.gateway.shutdown import DRAIN_SIGNAL

        for worker in self.wrks:
            if worker.inner.pid is not None:
                os.kill(worker.inner.pid, DRAIN_SIGNAL)
        super().signal_handler_interrupt(*args, **kwargs)  # type: ignore[no-untyped-call]

    def signal_handler_reload(self, *args: Any, **kwargs: Any) -> None:
        # granian would respawn the worker (the app, its runners and requests in flight); locopilot's
        # SIGHUP reloads only the upstream settings, in the worker (locopilot.app.listen_for_reload).
        for worker in self.wrks:
            if worker.inner.pid is not None:
                os.kill(worker.inner.pid, signal.SIGHUP)


class ServeRefused(Exception):
    """The server must not start as configured; the message says why and what to do instead."""


def check_exposure(settings: Settings) -> None:
    """Refuse a bind other machines can reach while no API key could be checked there.

    Raises:
        ServeRefused: ``LOCOPILOT_HOST`` is not a loopback address, no admin key is set
            and the database holds no working key (or cannot be opened).
    """
    from locopilot.gateway.auth import is_loopback
    from locopilot.store import keys
    from locopilot.store.db import Database, StoreError

    if is_loopback(settings.host) or settings.admin_secret:
        return
    try:
        db = Database.open(settings.db_path)
        try:
            usable = keys.any_active(db, time.time())
        finally:
            db.close()
    except StoreError as exc:
        raise ServeRefused(f"cannot check for API keys before listening on {settings.host}: {exc}") from exc
    if not usable:
        raise ServeRefused(
            f"refusing to listen on {settings.host}: no API key is configured, so anyone who can reach "
            "this address could use every model and every admin route. Create a key first "
            "(`locopilot keys create NAME --scope inference`), or set LOCOPILOT_ADMIN_KEY or "
            "LOCOPILOT_ADMIN_KEY_FILE, or listen on 127.0.0.1 (LOCOPILOT_HOST)."
        )


def main() -> int:
    """``locopilot serve``: the settings from the environment, then :func:`serve`.

    Returns 2 for bad settings and 1 when serving is refused, saying why on standard
    error. ``python -m locopilot serve`` comes here without the command line's imports
    (click, rich); ``locopilot serve`` with options goes through click first.
    """
    import sys

    from locopilot.settings import SettingsError

    skip_httpx_command_line()
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serve(settings)
    except ServeRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def skip_httpx_command_line() -> None:
    """Keep httpx's own command line (``httpx._main``) from loading in this process.

    ``import httpx`` imports it, and with it click, rich and pygments when they are
    installed (they are: locopilot's command line uses the first two): about 0.15 s of
    CPU at every start, in a server that never runs ``httpx``'s command. A placeholder
    module takes its place; it must be in place before httpx is first imported, so
    this does nothing once it is. Depends on httpx's ``__init__`` importing ``main``
    from ``._main`` (httpx 0.28): see :mod:`locopilot.dependency_internals`.
    """
    import sys
    import types

    if "httpx" in sys.modules:
        return
    placeholder = types.ModuleType("httpx._main", "httpx's command line, not loaded in the server (locopilot.server).")

    def main() -> None:
        raise RuntimeError("httpx's command line is not loaded in the locopilot server")

    placeholder.main = main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = placeholder


def serve(settings: Settings) -> None:
    """Block serving until a signal stops the server.

    Raises:
        ServeRefused: see :func:`check_exposure`; nothing has started.
    """
    from granian.constants import Interfaces
    from granian.log import LogLevels

    settings.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.models_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_exposure(settings)
    from locopilot.bundle import remove_leftovers

    # granian configures logging again when it starts; this is for the lines below.
    configure_logging(settings.log_level, resolve_format(settings.log_format))
    remove_leftovers()
    server = DrainingServer(
        target="locopilot",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=1,
        log_level=LogLevels(settings.log_level),
        log_dictconfig=logging_config(settings.log_level, resolve_format(settings.log_format)),
        respawn_failed_workers=True,
        workers_kill_timeout=math.ceil(settings.shutdown_grace) + STOP_SECONDS,
        # granian serves HTTPS itself when given a certificate and key (TLS 1.3 at least).
        ssl_cert=Path(settings.tls_cert).expanduser() if settings.tls_cert else None,
        ssl_key=Path(settings.tls_key).expanduser() if settings.tls_key else None,
    )
    server.serve(target_loader=app_from_environment)
