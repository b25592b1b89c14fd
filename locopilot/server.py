"""Run the app under granian: one worker process, graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from locopilot.settings import Settings, load_settings

SHUTDOWN_GRACE_SECONDS = 30


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def app_from_environment(_target: str = "") -> Any:
    """granian's loader, called in the worker process: settings → app.

    The worker reads the same environment the parent already validated.
    granian imports a string target relative to the working directory first
    (a stray folder there could shadow ours), so it gets this explicit loader.
    """
    from locopilot.app import create_app

    settings = load_settings(os.environ)
    configure_logging(settings.log_level)
    return create_app(settings)


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


def serve(settings: Settings) -> None:
    """Block serving until a signal stops the server.

    Raises:
        ServeRefused: see :func:`check_exposure`; nothing has started.
    """
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    settings.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.models_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_exposure(settings)
    server = Server(
        target="locopilot",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=1,
        log_level=LogLevels(settings.log_level),
        respawn_failed_workers=True,
        workers_kill_timeout=SHUTDOWN_GRACE_SECONDS,
        # granian serves HTTPS itself when given a certificate and key (TLS 1.3 at least).
        ssl_cert=Path(settings.tls_cert).expanduser() if settings.tls_cert else None,
        ssl_key=Path(settings.tls_key).expanduser() if settings.tls_key else None,
    )
    server.serve(target_loader=app_from_environment)
