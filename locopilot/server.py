"""Run the app under granian: one worker process, graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
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


def serve(settings: Settings) -> None:
    """Block serving until a signal stops the server."""
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    settings.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.models_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    server = Server(
        target="locopilot",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=1,
        log_level=LogLevels(settings.log_level),
        respawn_failed_workers=True,
        workers_kill_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    server.serve(target_loader=app_from_environment)
