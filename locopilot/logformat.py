"""Log lines on stderr: one JSON object per line (journald, log shippers) or text for a person.

Every line has ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``event`` and
``message``. A record about one request carries that request's fields, passed as
``extra={...}`` (see :data:`FIELDS`); only those names are written, so no other attribute
of a record (a prompt, a header) can reach a line by accident. Code that logs must never
put a secret or a prompt in a message or a field: key ids, model and provider names,
statuses and timings only.
"""

from __future__ import annotations

import logging
import logging.config
import sys
import time
from typing import Any, Literal, TextIO

import msgspec

#: The request fields a record may carry, in the order text lines show them.
FIELDS = (
    "request_id",
    "key_id",
    "method",
    "path",
    "endpoint",
    "model",
    "provider",
    "status",
    "outcome",
    "error",
    "latency_ms",
    "ttfb_ms",
    "tokens_in",
    "tokens_out",
    "pid",
)

_encoder = msgspec.json.Encoder(enc_hook=str)


def _timestamp(created: float) -> str:
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    found = record.__dict__
    return {name: found[name] for name in FIELDS if found.get(name) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode()


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.000Z INFO locopilot.access: message request_id=... status=200``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{name}={value}" for name, value in _fields(record).items())
        text = f"{_timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if fields:
            text += " " + fields
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def resolve_format(setting: Literal["auto", "json", "text"], stream: TextIO | None = None) -> Literal["json", "text"]:
    """``auto`` is text when ``stream`` (stderr) is a terminal, else JSON."""
    if setting != "auto":
        return setting
    stream = stream or sys.stderr
    return "text" if stream.isatty() else "json"


def logging_config(level: str, fmt: Literal["json", "text"]) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` that sends every logger, granian's included, to stderr.

    granian takes it as ``log_dictconfig`` and applies it in its main process and in each
    worker (a worker is a fresh process: it must be able to import the formatter by name).
    """
    formatter = "locopilot.logformat.JsonFormatter" if fmt == "json" else "locopilot.logformat.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"locopilot": {"()": formatter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "locopilot", "stream": "ext://sys.stderr"}
        },
        # granian's own loggers (its default config prints them on stdout) come here too.
        "loggers": {
            "_granian": {"handlers": [], "propagate": True},
            "granian.access": {"handlers": [], "propagate": True},
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def configure_logging(level: str, fmt: Literal["json", "text"]) -> None:
    logging.config.dictConfig(logging_config(level, fmt))
