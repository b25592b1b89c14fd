"""Admin routes (scope ``admin``): API keys and the audit trail.

Every change made here is audited by :func:`~locopilot.gateway.auth.run_audited`,
which writes one row per request; a handler names the action with
:func:`~locopilot.gateway.auth.note`. A new key's secret is in the creation
response and nowhere else, ever.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import Parameter

from locopilot.api.responses import BODY, GUARDED, answers, json_response
from locopilot.gateway.auth import Authenticator, note
from locopilot.store import audit, keys
from locopilot.store.db import Database
from locopilot.store.keys import ApiKey, KeySpec, KeyState


class KeyInfo(ApiKey, frozen=True, kw_only=True):
    """A key as the admin API shows it: never its secret or hash."""

    state: KeyState
    object: str = "api_key"


class CreatedKey(KeyInfo, frozen=True, kw_only=True):
    """The answer to a creation: the only time the secret is shown."""

    secret: str


class KeyList(msgspec.Struct):
    data: list[KeyInfo]
    object: str = "list"


class AuditList(msgspec.Struct):
    data: list[audit.AuditEvent]
    object: str = "list"


def key_info(key: ApiKey, now: float) -> KeyInfo:
    return KeyInfo(**msgspec.structs.asdict(key), state=key.state_at(now))


@post("/v1/admin/keys", status_code=201, responses=answers(CreatedKey, 201, *GUARDED, *BODY))
async def create_key(
    data: KeySpec, db: Database, auth: Authenticator, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """Create a key; the response holds its secret, shown this once."""
    now = auth.clock()
    key, secret = await db.call(keys.create, data, now)
    auth.key_created()
    note(request, "key_created", key=key.id, name=key.name, scopes=list(key.scopes))
    created = CreatedKey(**msgspec.structs.asdict(key_info(key, now)), secret=secret)
    return json_response(created, 201)


@get("/v1/admin/keys", responses=answers(KeyList, 200, *GUARDED))
async def list_keys(db: Database, auth: Authenticator) -> Response[bytes]:
    """Every key, revoked and expired ones too, oldest first."""
    now = auth.clock()
    found = await db.call(keys.listed)
    return json_response(KeyList([key_info(key, now) for key in found]))


@get("/v1/admin/keys/{key_id:str}", responses=answers(KeyInfo, 200, *GUARDED, 400, 404))
async def get_key(key_id: str, db: Database, auth: Authenticator) -> Response[bytes]:
    """One key, by id or by the name of a live key."""
    key = await db.call(keys.find, key_id)
    return json_response(key_info(key, auth.clock()))


@delete("/v1/admin/keys/{key_id:str}", status_code=200, responses=answers(KeyInfo, 200, *GUARDED, 400, 404))
async def revoke_key(
    key_id: str, db: Database, auth: Authenticator, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """Revoke a key (by id or live name); it fails with 401 from the next request on."""
    now = auth.clock()
    found = await db.call(keys.find, key_id)
    key = await db.call(keys.revoke, found.id, now)
    note(request, "key_revoked", key=key.id, name=key.name)
    return json_response(key_info(key, now))


@get("/v1/admin/audit", responses=answers(AuditList, 200, *GUARDED, 400))
async def audit_events(
    db: Database,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    event: Annotated[str | None, Parameter(max_length=64)] = None,
) -> Response[bytes]:
    """The newest audit events (authentication failures, refusals, admin changes), newest first."""
    found = await db.call(audit.recent, limit=limit, event=event)
    return json_response(AuditList(found))


ROUTES = [create_key, list_keys, get_key, revoke_key, audit_events]
