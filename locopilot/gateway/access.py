"""Request ids and the access log: every response carries ``X-Request-Id``, every request one log line.

A request's id is the client's ``X-Request-Id`` when it is sane (1 to 128 characters of
``A-Z a-z 0-9 . _ : -``), else one made here. The same id is the reply's ``id``, the request
log row's ``request_id`` and the log line's ``request_id``.

One line per request: an inference request's line is written by the usage recorder when it
records the outcome (it knows the model, provider and tokens); every other request's line,
and the line of an inference request refused before it had an outcome, is written here when
the response has been sent.

:class:`AccessLog` wraps the whole Litestar handler rather than being a Litestar middleware,
because Litestar runs middleware only for matched routes: a 404 or a 405 would carry no id.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("locopilot.access")

HEADER = b"x-request-id"
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_STATE_KEY = "locopilot.request"


def sane_request_id(value: str) -> str | None:
    """``value`` if it can be a request id (echoed in a header, written to the log), else None."""
    return value if SANE_ID.fullmatch(value) else None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class RequestContext:
    """What the access log knows about one request; lives in the ASGI scope's state."""

    id: str | None  # the client's, or None until someone needs one
    started: float = field(default_factory=time.perf_counter)
    outcome: bool = False  # the usage recorder writes this request's line


def context_of(scope: Scope) -> RequestContext:
    state: dict[str, Any] = scope.setdefault("state", {})
    context = state.get(_STATE_KEY)
    if not isinstance(context, RequestContext):
        context = state[_STATE_KEY] = RequestContext(None)
    return context


def request_id_of(scope: Scope, prefix: str = "req") -> str:
    """This request's id, made now (``prefix-<hex>``) if the client sent none."""
    context = context_of(scope)
    if context.id is None:
        context.id = new_request_id(prefix)
    return context.id


def outcome_id(scope: Scope, prefix: str) -> str:
    """The id for the request's Outcome; from now on the usage recorder writes its log line."""
    context = context_of(scope)
    context.outcome = True
    return request_id_of(scope, prefix)


def _client_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            return sane_request_id(value.decode("latin-1"))
    return None


class AccessLog:
    """ASGI wrapper: give each HTTP request an id, put it on the response, log the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        context = context_of(scope)
        context.id = _client_id(scope)
        status = 500  # what the client sees if the app fails before answering

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                headers.append((HEADER, request_id_of(scope).encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, stamped)
        finally:
            if not context.outcome:
                log_request(scope, context, status)


def log_request(scope: Scope, context: RequestContext, status: int) -> None:
    user = scope.get("user")
    log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "%s %s %d",
        scope.get("method", ""),
        scope.get("path", ""),
        status,
        extra={
            "event": "request",
            "request_id": request_id_of(scope),
            "key_id": getattr(user, "key_id", None),
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "latency_ms": round((time.perf_counter() - context.started) * 1000, 3),
        },
    )
