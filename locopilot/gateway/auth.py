"""Authentication and per-key policy: API key → principal (scopes, model allowlist, privacy pin).

:func:`admit_request` runs before every route handler (in :mod:`locopilot.gateway.guard`). It finds the key in
``Authorization: Bearer <key>`` (or ``x-api-key``), looks it up by hash, and
checks the scope :data:`ROUTE_SCOPES` names for the route. A route missing from
that table needs ``admin``, so a new route is never open by accident. It puts the
:class:`Principal` in ``scope["user"]`` (``request.user``) and an
:class:`AuthContext` in ``scope["auth"]``.

Who gets in:

- ``GET /health``, Ollama's root probe ``GET|HEAD /`` (the console's page for a browser) and the
  console's static files ``GET /console/{file}`` (``exclude_from_auth``): always, no key looked at.
- ``GET /v1/models`` and ``GET /v1/models/{id}`` with ``LOCOPILOT_PUBLIC_MODELS``, and
  ``GET /metrics`` with ``LOCOPILOT_METRICS_PUBLIC``: without a key; a key, if sent, must be valid.
- Open mode: no admin key and no key ever created (a revoked key still counts,
  so revoking the last key never opens a server) and a loopback bind. Every
  request gets every scope. On any other bind nothing is ever open.
- Otherwise a valid key with the route's scope: 401 without one, 403 without the scope.

Every refusal and every admin change is written to the audit trail
(:mod:`locopilot.store.audit`) without the key. The key itself never reaches a
log, an error message or the database: only its SHA-256 is compared.

A principal's privacy pin and model allowlist are its :attr:`Principal.constraints`,
which the router applies (:meth:`locopilot.gateway.router.Router.plan`); a model the
allowlist refuses goes to the audit trail through :meth:`Authenticator.refused_model`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from litestar import Request
from litestar.datastructures import Headers
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from locopilot.errors import (
    AuthenticationError,
    LocopilotError,
    MissingScope,
    ModelNotAllowed,
    Unavailable,
)
from locopilot.gateway.router import Constraints
from locopilot.settings import Privacy, Settings
from locopilot.store import audit, keys
from locopilot.store.db import Database, StoreError
from locopilot.store.keys import SCOPES, ApiKey
from locopilot.store.keys import Scope as KeyScope

log = logging.getLogger(__name__)


class _Public:
    """The marker for routes that need no key (see :data:`ROUTE_SCOPES`)."""

    def __repr__(self) -> str:
        return "PUBLIC"


PUBLIC: Final = _Public()
#: Any valid key, whatever its scopes.
ANY_KEY: Final = None
Requirement = KeyScope | _Public | None

#: What each route needs, by ``"METHOD path_template"``. A route not listed needs ``admin``.
#: ``/v1/engine/health`` names each provider, its last error and the data paths: the
#: operator's view, so ``admin``. ``GET /health`` is the open liveness probe.
ROUTE_SCOPES: dict[str, Requirement] = {
    "POST /v1/chat/completions": "inference",
    "POST /v1/completions": "inference",
    "POST /v1/embeddings": "inference",
    "POST /v1/responses": "inference",
    "GET /v1/responses/{response_id}": "inference",
    "DELETE /v1/responses/{response_id}": "inference",
    "POST /v1/responses/{response_id}/cancel": "inference",
    "GET /v1/responses/{response_id}/input_items": "inference",
    "POST /v1/messages": "inference",
    "POST /v1/messages/count_tokens": "inference",
    "GET /v1/models": "inference",
    "GET /v1/models/{model_id}": "inference",
    "POST /api/chat": "inference",
    "POST /api/generate": "inference",
    "POST /api/embed": "inference",
    "POST /api/embeddings": "inference",
    "GET /api/tags": "inference",
    "POST /api/show": "inference",
    "GET /api/ps": "inference",
    "GET /api/version": "inference",
    "DELETE /api/delete": "models",
    "POST /api/copy": "models",
    "POST /api/pull": "models",
    "GET /v1/engine/health": "admin",
    "GET /v1/engine/stats": "admin",
    "GET /v1/admin/keys": "admin",
    "POST /v1/admin/keys": "admin",
    "GET /v1/admin/keys/{key_id}": "admin",
    "DELETE /v1/admin/keys/{key_id}": "admin",
    "GET /v1/admin/audit": "admin",
    "GET /v1/admin/hosts": "admin",
    "POST /v1/admin/hosts": "admin",
    "DELETE /v1/admin/hosts/{host}": "admin",
    "GET /metrics": "admin",
    "POST /v1/files": "training",
    "GET /v1/files": "training",
    "GET /v1/files/{file_id}": "training",
    "DELETE /v1/files/{file_id}": "training",
    # The request log holds every key's prompts: an admin's to read.
    "POST /v1/locopilot/datasets/from-logs": "admin",
    "POST /v1/locopilot/training/jobs": "training",
    "GET /v1/locopilot/training/jobs": "training",
    "GET /v1/locopilot/training/jobs/{job_id}": "training",
    "POST /v1/locopilot/training/jobs/{job_id}/cancel": "training",
    "GET /v1/locopilot/training/jobs/{job_id}/logs": "training",
    "POST /v1/fine_tuning/jobs": "training",
    "GET /v1/fine_tuning/jobs": "training",
    "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}": "training",
    "POST /v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel": "training",
    "GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/events": "training",
    "GET /v1/locopilot/models": "models",
    "POST /v1/locopilot/models": "models",
    "POST /v1/locopilot/models/import": "models",
    "POST /v1/locopilot/models/{model_id}/verify": "models",
    "POST /v1/locopilot/models/pull": "models",
    "GET /v1/locopilot/models/{model_id}": "models",
    "DELETE /v1/locopilot/models/{model_id}": "models",
    "POST /v1/locopilot/models/{model_id}/load": "models",
    "POST /v1/locopilot/models/{model_id}/unload": "models",
    "GET /v1/locopilot/me": ANY_KEY,
    "GET /v1/locopilot/traffic": "admin",
    "GET /v1/locopilot/usage": "admin",
    "GET /v1/locopilot/settings": "admin",
}
#: Answered without a key when LOCOPILOT_PUBLIC_MODELS is true.
PUBLIC_MODEL_ROUTES = frozenset({"GET /v1/models", "GET /v1/models/{model_id}"})
#: Answered without a key when LOCOPILOT_METRICS_PUBLIC is true.
METRICS_ROUTE = "GET /metrics"
#: The OpenAPI schema and its viewers (``create_app`` serves them here): any valid key.
DOCS_PATH = "/openapi"
#: Longer than any key this server issues or accepts (an admin key is whatever the operator chose).
MAX_KEY_LENGTH = 512
#: How long an open server trusts that no key has been created meanwhile (the CLI is another process).
OPEN_CHECK_SECONDS = 1.0
#: ``last_used_at`` is written at most this often per key.
TOUCH_SECONDS = 60.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class KeyRefused(AuthenticationError):
    """A 401 with why, for the audit trail: ``missing``, ``malformed``, ``invalid``, ``revoked``,
    ``expired``. ``key_id`` is set when the key is known (revoked, expired)."""

    def __init__(self, reason: str, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id


@dataclass(frozen=True)
class Principal:
    """Who a request acts for. ``key_id`` is None in open mode and for an anonymous public request."""

    key_id: str | None
    name: str
    scopes: frozenset[KeyScope]
    models: tuple[str, ...] | None = None
    privacy: Privacy | None = None
    rpm: int | None = None
    tpm: int | None = None

    @property
    def constraints(self) -> Constraints:
        """What the router may plan for this principal."""
        return Constraints(self.privacy, self.models)

    @classmethod
    def of_key(cls, key: ApiKey) -> Principal:
        return cls(key.id, key.name, frozenset(key.scopes), key.models, key.privacy, key.rpm, key.tpm)


OPEN = Principal(None, "open", frozenset(SCOPES))
ANONYMOUS = Principal(None, "anonymous", frozenset())
BOOTSTRAP_ADMIN_ID = "admin"


@dataclass
class AuthContext:
    """Per request, in ``scope["auth"]``: what an admin handler did, for the audit trail."""

    event: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def required_scope(route: str, settings: Settings) -> Requirement:
    """What ``route`` (``"METHOD path_template"``) needs: PUBLIC, ANY_KEY or a scope."""
    if settings.public_models and route in PUBLIC_MODEL_ROUTES:
        return PUBLIC
    if settings.metrics_public and route == METRICS_ROUTE:
        return PUBLIC
    path = route.partition(" ")[2]
    if path == DOCS_PATH or path.startswith(DOCS_PATH + "/"):
        return ANY_KEY
    return ROUTE_SCOPES.get(route, "admin")


def presented_key(headers: Headers) -> str | None:
    """The key a request sends, if any.

    Raises:
        AuthenticationError: an Authorization header that is not ``Bearer <key>``.
    """
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise KeyRefused("malformed", "The Authorization header must be 'Bearer <API key>'.")
        return token.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key is not None else None


class Authenticator:
    """Keys → principals for one server; built by the app's lifespan, kept in ``Services``.

    ``clock`` gives unix seconds (expiry, audit times); injectable for tests.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.loopback = is_loopback(settings.host)
        self.admin_hash = keys.hash_secret(settings.admin_secret) if settings.admin_secret else None
        self._keys_exist = False
        self._checked_at = -1e18
        self._touched: dict[str, float] = {}

    # -- who is asking --------------------------------------------------------------

    async def is_open(self) -> bool:
        """Whether requests need no key: loopback, no admin key, no key ever created."""
        if self.admin_hash is not None or not self.loopback or self._keys_exist:
            return False
        now = time.monotonic()
        if now - self._checked_at >= OPEN_CHECK_SECONDS:
            self._keys_exist = await self.db.call(keys.any_created)
            self._checked_at = now
        return not self._keys_exist

    def key_created(self) -> None:
        """A key was made in this process: requests need keys from now on."""
        self._keys_exist = True

    async def admit(self, scope: Scope, route: str) -> Principal:
        """The principal for a request to ``route``, or a refusal (audited).

        Raises:
            AuthenticationError: no key where one is needed, or a key that does not work.
            MissingScope: a working key without the route's scope.
            Unavailable: the key store cannot be read (nobody is let in).
        """
        required = required_scope(route, self.settings)
        try:
            principal = await self._identify(Headers.from_scope(scope), required)
        except KeyRefused as exc:
            self.audit(scope, "auth_failed", exc, exc.reason, key_id=exc.key_id)
            raise
        if isinstance(required, str) and required not in principal.scopes:
            refusal = MissingScope(
                f"This API key lacks the '{required}' scope that this route needs.", param="authorization"
            )
            self.audit(scope, "forbidden", refusal, "scope", key_id=principal.key_id, detail={"scope": required})
            raise refusal
        if principal.key_id is not None and principal.key_id != BOOTSTRAP_ADMIN_ID:
            self._touch(principal.key_id)
        return principal

    async def _identify(self, headers: Headers, required: Requirement) -> Principal:
        if await self.is_open():
            return OPEN
        presented = presented_key(headers)
        if presented is None and isinstance(required, _Public):
            return ANONYMOUS
        if presented is None:
            raise KeyRefused(
                "missing", "Missing API key. Send it as 'Authorization: Bearer <API key>' or 'x-api-key: <API key>'."
            )
        if len(presented) > MAX_KEY_LENGTH:
            raise KeyRefused("invalid", "Invalid API key.")
        presented_hash = keys.hash_secret(presented)
        if self.admin_hash is not None and hmac.compare_digest(presented_hash, self.admin_hash):
            return Principal(BOOTSTRAP_ADMIN_ID, "bootstrap admin", frozenset(SCOPES))
        try:
            key = await self.db.call(keys.by_hash, presented_hash)
        except StoreError as exc:
            # Fail closed, but say it is the server's fault: the key may well be good.
            log.error("cannot look up an API key: %s", exc)
            raise Unavailable("API keys cannot be checked right now.", retry_after=5) from exc
        if key is None:
            raise KeyRefused("invalid", "Invalid API key.")
        match key.state_at(self.clock()):
            case "revoked":
                raise KeyRefused("revoked", "This API key has been revoked.", key.id)
            case "expired":
                raise KeyRefused("expired", "This API key has expired.", key.id)
        return Principal.of_key(key)

    def _touch(self, key_id: str) -> None:
        now = self.clock()
        if now - self._touched.get(key_id, -1e18) < TOUCH_SECONDS:
            return
        self._touched[key_id] = now
        try:
            keys.touch(self.db, key_id, now)
        except StoreError as exc:
            log.error("cannot note an API key's use: %s", exc)

    # -- what it may do ---------------------------------------------------------------

    def refused_model(self, request: Request[Any, Any, Any], exc: ModelNotAllowed, model: str) -> None:
        """Write the router's refusal of a model by the key's allowlist to the audit trail."""
        key_id = principal_of(request).key_id
        self.audit(request.scope, "forbidden", exc, "model", key_id=key_id, detail={"model": model[:256]})

    # -- the audit trail ---------------------------------------------------------------

    def audit(
        self,
        scope: Scope,
        event: str,
        error: LocopilotError | None,
        reason: str | None = None,
        *,
        key_id: str | None = None,
        status: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Queue one audit row for this request; never the key, the headers or the query string."""
        principal = scope.get("user")
        if key_id is None and isinstance(principal, Principal):
            key_id = principal.key_id
        client = scope.get("client")
        row = audit.AuditEvent(
            created_at=self.clock(),
            event=event,
            key_id=key_id,
            client=client[0] if client else None,
            method=str(scope.get("method", "")) or None,
            path=scope.get("path"),
            status=error.status_code if error is not None else status,
            detail={**({"reason": reason} if reason else {}), **(detail or {})} or None,
        )
        try:
            audit.record(self.db, row)
        except StoreError as exc:
            log.error("audit trail unavailable: %s", exc)


def principal_of(request: Request[Any, Any, Any]) -> Principal:
    """The principal :func:`admit_request` admitted; requests it did not see act as nobody."""
    user = request.scope.get("user")
    return user if isinstance(user, Principal) else ANONYMOUS


def note(request: Request[Any, Any, Any], event: str, **detail: Any) -> None:
    """Name the admin action this request performs, for its audit row (no secrets in ``detail``)."""
    context = request.scope.get("auth")
    if isinstance(context, AuthContext):
        context.event = event
        context.detail.update(detail)


async def admit_request(scope: Scope) -> bool:
    """Admit or refuse one HTTP request before its handler (see the module docstring): the
    principal goes to ``scope["user"]``, an :class:`AuthContext` to ``scope["auth"]``.

    Returns whether the request is an admin change, to be run through :func:`run_audited`.

    Raises:
        AuthenticationError, MissingScope, Unavailable: see :meth:`Authenticator.admit`.
    """
    method = scope["method"]  # type: ignore[typeddict-item]
    if method == "OPTIONS":  # a CORS preflight carries no credentials
        return False
    authenticator: Authenticator = scope["app"].state.services.auth
    route = f"{method} {scope['path_template']}"
    scope["user"] = await authenticator.admit(scope, route)
    scope["auth"] = AuthContext()
    return method not in SAFE_METHODS and required_scope(route, authenticator.settings) == "admin"


async def run_audited(scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
    """``next_app``, then the admin change's audit row, with the status the client got."""
    authenticator: Authenticator = scope["app"].state.services.auth
    context: AuthContext = scope["auth"]
    status: int | None = None

    async def noting_status(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        await next_app(scope, receive, noting_status)
    except Exception as exc:
        status = getattr(exc, "status_code", 500)
        raise
    finally:
        authenticator.audit(scope, context.event or "admin_action", None, status=status, detail=context.detail or None)
