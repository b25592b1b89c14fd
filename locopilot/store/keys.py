"""API keys: the ``api_keys`` table. Secrets are made here and only their SHA-256 is stored.

A secret is ``lcp_`` followed by 43 URL-safe characters (32 random bytes). Its
SHA-256 is a fine key hash for a secret this long: nobody can guess 256 bits, so
the slow, salted hashes made for passwords buy nothing, and a plain hash can be
looked up through a unique index. A lookup by hash takes the same time however
many leading characters of a guess are right, unlike comparing secrets.

Writes wait for the writer thread and reads block the calling thread; from async
code call these in a worker thread. ``now`` is unix seconds, passed in.

Raises, besides :class:`~locopilot.store.db.StoreError`: :class:`~locopilot.errors.NotFound`
(code ``key_not_found``) for a key that does not exist, and
:class:`~locopilot.errors.InvalidRequest` for a spec the table cannot take.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Annotated, Literal

import apsw
import msgspec
from msgspec import Meta

from locopilot.errors import InvalidRequest, NotFound
from locopilot.settings import Privacy
from locopilot.store.db import Database

_log = logging.getLogger(__name__)

Scope = Literal["inference", "models", "training", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "models", "training", "admin")
SECRET_PREFIX = "lcp_"  # noqa: S105 (the marker every key starts with, not a secret)
#: Characters of the secret kept to tell keys apart in a list: the marker and six random ones.
SHOWN_PREFIX_LENGTH = len(SECRET_PREFIX) + 6
KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"
ALLOWLIST_ENTRY = r"^\S{1,256}$"
MAX_ALLOWLIST = 1000
KeyState = Literal["active", "expired", "revoked"]


class KeySpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a new key may do; the body of ``POST /v1/admin/keys`` and what ``keys create`` builds."""

    name: Annotated[str, Meta(pattern=KEY_NAME, description="A label, unique among live keys.")]
    scopes: Annotated[tuple[Scope, ...], Meta(min_length=1, max_length=len(SCOPES))] = ("inference",)
    models: (
        Annotated[
            tuple[Annotated[str, Meta(pattern=ALLOWLIST_ENTRY)], ...],
            Meta(min_length=1, max_length=MAX_ALLOWLIST, description="Allowed models; null allows every model."),
        ]
        | None
    ) = None
    privacy: Annotated[Privacy | None, Meta(description="The loosest policy this key's requests get.")] = None
    rpm: Annotated[int, Meta(ge=1, le=10**9)] | None = None
    tpm: Annotated[int, Meta(ge=1, le=10**12)] | None = None
    expires: Annotated[
        str | None, Meta(description="When the key stops working: a duration (`30d`, `12h`, `90m`) or an ISO date.")
    ] = None


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """One key as stored, without its secret (which is never stored)."""

    id: str
    name: str
    prefix: str
    scopes: tuple[Scope, ...]
    models: tuple[str, ...] | None = None
    privacy: Privacy | None = None
    rpm: int | None = None
    tpm: int | None = None
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None

    def state_at(self, now: float) -> KeyState:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


_COLUMNS = ", ".join(ApiKey.__struct_fields__)
_JSON_COLUMNS = ("scopes", "models")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The stored form of ``secret``: SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


_DURATION = re.compile(r"^(\d{1,6})\s*([mhdw])$")
_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str, now: float) -> float:
    """Unix seconds for ``30d``/``12h``/``90m``/``2w`` from ``now``, or an ISO date or time (UTC if no zone).

    Raises:
        InvalidRequest: ``text`` is neither, or lies in the past.
    """
    text = text.strip()
    if match := _DURATION.match(text.lower()):
        return now + int(match.group(1)) * _SECONDS[match.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"expires must be a duration like 30d, 12h or 90m, or an ISO date like 2030-01-31, not {text!r}",
            param="expires",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    expires_at = when.timestamp()
    if expires_at <= now:
        raise InvalidRequest(f"expires {text!r} is in the past", param="expires")
    return expires_at


def _row(names: tuple[str, ...], row: apsw.SQLiteValues) -> ApiKey:
    values = dict(zip(names, row, strict=True))
    for column in _JSON_COLUMNS:
        if isinstance(text := values[column], str):
            values[column] = msgspec.json.decode(text)
    return msgspec.convert(values, ApiKey)


def _select(conn: apsw.Connection, where: str, params: dict[str, object]) -> list[ApiKey]:
    # ``where`` is one of this module's literals; values are always bound.
    sql = f"SELECT {_COLUMNS} FROM api_keys WHERE {where} ORDER BY created_at, id"  # noqa: S608
    return [_row(ApiKey.__struct_fields__, row) for row in conn.execute(sql, params)]


def create(db: Database, spec: KeySpec, now: float) -> tuple[ApiKey, str]:
    """Store a new key for ``spec``; returns it with its secret, which cannot be had again.

    Raises:
        InvalidRequest: a live key has this name, or ``spec.expires`` is not a future time.
    """
    expires_at = None if spec.expires is None else parse_expiry(spec.expires, now)
    secret = new_secret()
    key = ApiKey(
        id="key_" + secrets.token_hex(8),
        name=spec.name,
        prefix=secret[:SHOWN_PREFIX_LENGTH],
        scopes=tuple(s for s in SCOPES if s in spec.scopes),
        models=None if spec.models is None else tuple(dict.fromkeys(spec.models)),
        privacy=spec.privacy,
        rpm=spec.rpm,
        tpm=spec.tpm,
        created_at=now,
        expires_at=expires_at,
    )
    params = msgspec.structs.asdict(key)
    for column in _JSON_COLUMNS:
        if params[column] is not None:
            params[column] = msgspec.json.encode(params[column]).decode()
    params["hash"] = hash_secret(secret)
    names = [*ApiKey.__struct_fields__, "hash"]
    sql = f"INSERT INTO api_keys ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)})"  # noqa: S608

    def insert(conn: apsw.Connection) -> None:
        if _select(conn, "name = :name AND revoked_at IS NULL", {"name": spec.name}):
            raise InvalidRequest(
                f"A live key is already named {spec.name!r}; revoke it or choose another name.",
                param="name",
                code="key_name_taken",
            )
        conn.execute(sql, params)

    db.submit(insert).result()
    return key, secret


def by_hash(db: Database, key_hash: str) -> ApiKey | None:
    """The key whose secret hashes to ``key_hash``, whatever its state; None if there is none."""
    found = db.read(lambda conn: _select(conn, "hash = :hash", {"hash": key_hash}))
    return found[0] if found else None


def listed(db: Database) -> list[ApiKey]:
    """Every key, revoked and expired ones too, oldest first."""
    return db.read(lambda conn: _select(conn, "1", {}))


def any_created(db: Database) -> bool:
    """Whether any key was ever created (a revoked key counts: it stays in the table)."""
    return bool(db.read(lambda conn: conn.execute("SELECT EXISTS (SELECT 1 FROM api_keys)").get))


def any_active(db: Database, now: float) -> bool:
    """Whether some key works at ``now``: not revoked, not expired."""
    sql = (
        "SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > :now))"
    )
    return bool(db.read(lambda conn: conn.execute(sql, {"now": now}).get))


def find(db: Database, ref: str) -> ApiKey:
    """The key with id ``ref``, else the live key named ``ref``.

    Raises:
        NotFound: neither exists.
    """
    found = db.read(
        lambda conn: (
            _select(conn, "id = :ref", {"ref": ref})
            or _select(conn, "name = :ref AND revoked_at IS NULL", {"ref": ref})
        )
    )
    if not found:
        raise NotFound(f"No API key has the id or live name {ref!r}.", code="key_not_found")
    return found[0]


def revoke(db: Database, key_id: str, now: float) -> ApiKey:
    """Revoke the key ``key_id`` (from now on it fails with 401); revoking twice keeps the first time.

    Raises:
        NotFound: there is no such key.
    """

    def update(conn: apsw.Connection) -> ApiKey:
        conn.execute(
            "UPDATE api_keys SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL", {"id": key_id, "now": now}
        )
        found = _select(conn, "id = :id", {"id": key_id})
        if not found:
            raise NotFound(f"No API key has the id {key_id!r}.", code="key_not_found")
        return found[0]

    return db.submit(update).result()


def touch(db: Database, key_id: str, now: float) -> None:
    """Queue a ``last_used_at`` update and return at once; a failed update is logged, never raised.

    Raises:
        StoreError: the database is closed or its writer has stopped (nothing is queued).
    """
    future = db.write("UPDATE api_keys SET last_used_at = :now WHERE id = :id", {"id": key_id, "now": now})
    future.add_done_callback(_report_failure)


def _report_failure(future: Future[int]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        _log.error("could not note an API key's last use: %s", exc)
