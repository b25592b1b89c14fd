"""The web console: its static files, the page at ``/`` for browsers, and two routes it reads.

The shell (``GET /`` with ``Accept: text/html``, ``GET /console/{file}``) needs no key: it holds
no data, and every API call the console then makes carries the key the user signs in with
as a bearer header, through the same Host check, authentication and CORS rules as any client.
Every console file is sent with :data:`SECURITY_HEADERS`: a Content-Security-Policy that lets
the page run only its own script files (no inline script, no ``eval``) and talk only to this
server, so a model's answer shown in it can never run or fetch anything.

``GET /v1/locopilot/me`` (any key) says who the key is, its scopes and its own usage: the console
decides from it which pages to show. ``GET /v1/locopilot/traffic`` (admin) is the last hour of the
request log in one-minute buckets by provider and model, for the traffic charts; ``GET
/v1/locopilot/usage`` (admin) every key's usage over the last day, for the keys page; ``GET
/v1/locopilot/settings`` (admin) the effective configuration with secrets masked.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, get

from locopilot.api.responses import GUARDED, answers
from locopilot.errors import NotFound
from locopilot.gateway.auth import OPEN, principal_of
from locopilot.gateway.guard import EXCLUDE_FROM_AUTH
from locopilot.schemas.openai import encoder
from locopilot.settings import Privacy, Settings, describe, effective_items
from locopilot.store import stats
from locopilot.store.db import Database
from locopilot.web import Asset, console_assets

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # The files change with the server's version; a browser asks again rather than run an old one.
    "Cache-Control": "no-cache",
}
INDEX = "index.html"
#: The service worker's file; it may control the whole origin (the page is at ``/``).
SERVICE_WORKER = "sw.js"


@functools.cache
def assets() -> dict[str, Asset]:
    return console_assets()


def asset_response(name: str) -> Response[bytes]:
    """The console file ``name`` with :data:`SECURITY_HEADERS`; raises NotFound for any other name."""
    asset = assets().get(name)
    if asset is None:
        raise NotFound(f"The console has no file '{name}'.")
    headers = dict(SECURITY_HEADERS)
    if name == SERVICE_WORKER:
        headers["Service-Worker-Allowed"] = "/"
    if name == INDEX:
        headers["Vary"] = "Accept"  # "/" answers text to other clients
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def wants_page(request: Request[Any, Any, Any]) -> bool:
    """Whether a ``GET /`` comes from a browser (it asks for HTML), not an Ollama client's liveness probe."""
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def page() -> Response[bytes]:
    return asset_response(INDEX)


@get("/console/{name:str}", opt={EXCLUDE_FROM_AUTH: True}, include_in_schema=False)
async def console_file(name: str) -> Response[bytes]:
    """One of the console's static files; no key needed (they hold no data)."""
    return asset_response(name)


class Usage(msgspec.Struct):
    """Requests and tokens of one model over the last day."""

    model: str
    requests: int
    errors: int
    tokens_in: int
    tokens_out: int


class Me(msgspec.Struct):
    """Who the request's key is. ``open``: the server needs no key (loopback, none created)."""

    name: str
    key_id: str | None
    scopes: list[str]
    open: bool
    models: list[str] | None
    privacy: Privacy | None
    usage_last_day: list[Usage]
    object: str = "principal"


DAY = 86400.0


@get("/v1/locopilot/me", responses=answers(Me, 200, *GUARDED))
async def me(db: Database, request: Request[Any, Any, Any]) -> Response[bytes]:
    """The calling key: its name, scopes, model allowlist, privacy pin and its own usage over the last day."""
    principal = principal_of(request)
    rows = await db.call(stats.usage_by_key, time.time() - DAY)
    usage = [
        Usage(row.model, row.requests, row.errors, row.tokens_in, row.tokens_out)
        for row in rows
        if row.key_id == principal.key_id
    ]
    body = Me(
        name=principal.name,
        key_id=principal.key_id,
        scopes=sorted(principal.scopes),
        open=principal is OPEN,
        models=None if principal.models is None else list(principal.models),
        privacy=principal.privacy,
        usage_last_day=usage,
    )
    return Response(encoder.encode(body), media_type=MediaType.JSON)


HOUR = 3600.0
MINUTE = 60.0


@get("/v1/locopilot/traffic", responses=answers(stats.Traffic, 200, *GUARDED))
async def traffic(db: Database) -> Response[bytes]:
    """The last hour of requests by provider and model in one-minute buckets (requests, errors, output
    tokens, tokens/s) with latency percentiles."""
    now = time.time()
    # Buckets on whole minutes, the last one the current minute: asked again a few seconds later,
    # every bar stays where it was and only the last grows.
    since = (now // MINUTE + 1) * MINUTE - HOUR
    body = await db.call(stats.traffic, since, now, int(MINUTE))
    return Response(encoder.encode(body), media_type=MediaType.JSON)


class UsageList(msgspec.Struct):
    data: list[stats.KeyModelUsage]
    object: str = "list"


@get("/v1/locopilot/usage", responses=answers(UsageList, 200, *GUARDED))
async def usage(db: Database) -> Response[bytes]:
    """Every key's requests and tokens by model over the last day (``key_id`` null: open-mode requests)."""
    rows = await db.call(stats.usage_by_key, time.time() - DAY)
    return Response(encoder.encode(UsageList(rows)), media_type=MediaType.JSON)


class Setting(msgspec.Struct):
    variable: str
    value: str
    default: str
    description: str


class SettingList(msgspec.Struct):
    data: list[Setting]
    object: str = "list"


@get("/v1/locopilot/settings", responses=answers(SettingList, 200, *GUARDED))
async def effective_settings(settings: Settings) -> Response[bytes]:
    """The server's effective configuration, each variable with its value (secrets masked), default and
    description, as ``locopilot config`` prints it."""
    values = dict(effective_items(settings))
    body = SettingList(
        [Setting(info.variable, values[info.variable], info.default, info.description) for info in describe()]
    )
    return Response(encoder.encode(body), media_type=MediaType.JSON)


ROUTES = [console_file, me, traffic, usage, effective_settings]
