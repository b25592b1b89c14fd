"""Every route refuses a request without a working key: enumerated from the app, checked over HTTP.

A new route is covered the day it is added: the list comes from the app object,
and the OpenAPI schema the server publishes must not name a route the list lacks.
"""

from __future__ import annotations

import re

import httpx
import pytest

from locopilot.gateway.auth import METRICS_ROUTE, PUBLIC_MODEL_ROUTES, ROUTE_SCOPES
from tests.conftest import Server
from tests.security.conftest import (
    ADMIN,
    Route,
    app_routes,
    assert_unauthorized,
    audit_events,
    create_key,
    error_message,
    expire_key,
    request,
    revoke_key,
)

ROUTES = app_routes()
#: Open to all: the liveness probes (``/`` is Ollama's, which its clients call first, and the web
#: console's page for a browser) and the console's static files, which hold no data.
OPEN_ROUTES = {"GET /health", "GET /", "GET /console/{name}"}
GUARDED = [route for route in ROUTES if str(route) not in OPEN_ROUTES]


def test_the_app_has_the_routes_this_suite_expects() -> None:
    names = {str(route) for route in ROUTES}
    assert names >= OPEN_ROUTES
    assert {
        "POST /v1/chat/completions",
        "GET /v1/models",
        "POST /v1/admin/keys",
        "GET /openapi/openapi.json",
        "GET /metrics",
    } <= names


def test_every_route_has_a_decided_scope() -> None:
    """A route needs an entry in ROUTE_SCOPES (or is documentation, or open): a new route is a decision."""
    undecided = [
        str(route) for route in GUARDED if str(route) not in ROUTE_SCOPES and not route.template.startswith("/openapi")
    ]
    assert undecided == [], "add these to locopilot.gateway.auth.ROUTE_SCOPES"
    assert set(ROUTE_SCOPES) <= {str(route) for route in ROUTES}, "ROUTE_SCOPES names a route the app lacks"
    assert {str(route) for route in ROUTES} >= PUBLIC_MODEL_ROUTES
    assert ROUTE_SCOPES[METRICS_ROUTE] == "admin"  # public only with LOCOPILOT_METRICS_PUBLIC


def test_openapi_schema_names_no_route_outside_the_list(secured: Server) -> None:
    schema = httpx.get(f"{secured.url}/openapi/openapi.json", headers=ADMIN, timeout=10).json()
    listed = {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
    known = {str(route) for route in ROUTES}
    assert listed - known == set()
    assert len(listed) >= 10


def test_health_is_open(secured: Server) -> None:
    response = httpx.get(f"{secured.url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("route", GUARDED, ids=str)
def test_no_key_is_401(secured: Server, route: Route) -> None:
    assert_unauthorized(request(secured, route))


@pytest.mark.parametrize("route", GUARDED, ids=str)
def test_wrong_key_is_401(secured: Server, route: Route) -> None:
    wrong = "lcp_" + "A" * 43
    assert_unauthorized(request(secured, route, {"Authorization": f"Bearer {wrong}"}), wrong)
    assert_unauthorized(request(secured, route, {"x-api-key": wrong}), wrong)


def test_revoked_and_expired_keys_are_401_on_every_route(secured: Server) -> None:
    revoked = create_key(secured, name="soon-revoked", scopes=["inference", "models", "training", "admin"])
    expired = create_key(secured, name="soon-expired", scopes=["inference", "models", "training", "admin"])
    assert request(secured, Route("GET", "/v1/admin/keys"), revoked.headers).status_code == 200
    assert request(secured, Route("GET", "/v1/admin/keys"), expired.headers).status_code == 200
    revoke_key(secured, revoked)
    expire_key(secured, expired)
    for route in GUARDED:
        for key, reason in ((revoked, "revoked"), (expired, "expired")):
            response = request(secured, route, key.headers)
            assert_unauthorized(response, key.secret)
            assert reason in error_message(response), route
    failures = audit_events(secured, event="auth_failed")
    reasons = {(e["key_id"], e["detail"]["reason"]) for e in failures}
    assert {(revoked.id, "revoked"), (expired.id, "expired")} <= reasons


@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNz", "Bearer", "Token abc", "bearer", "Negotiate YIIG"],
)
def test_malformed_authorization_is_401(secured: Server, authorization: str) -> None:
    assert_unauthorized(request(secured, Route("GET", "/v1/models"), {"Authorization": authorization}))


def test_bearer_scheme_is_case_insensitive(secured: Server) -> None:
    key = create_key(secured, name="case")
    response = httpx.get(f"{secured.url}/v1/models", headers={"Authorization": f"bearer {key.secret}"}, timeout=10)
    assert response.status_code == 200


def test_failures_are_audited_without_the_key(secured: Server) -> None:
    wrong = "lcp_audit-canary-" + "z" * 20
    request(secured, Route("GET", "/v1/engine/stats"), {"Authorization": f"Bearer {wrong}"})
    request(secured, Route("POST", "/v1/chat/completions"))
    events = audit_events(secured, event="auth_failed")
    assert wrong not in str(events)
    mine = [e for e in events if e["path"] == "/v1/engine/stats" and e["detail"] == {"reason": "invalid"}]
    assert mine
    assert mine[0]["client"] == "127.0.0.1"
    assert mine[0]["status"] == 401
    assert mine[0]["method"] == "GET"
    assert any(e["path"] == "/v1/chat/completions" and e["detail"] == {"reason": "missing"} for e in events)


def test_unknown_path_is_404_not_a_hint(secured: Server) -> None:
    # Unrouted paths answer 404 with or without a key: nothing behind them to protect.
    response = httpx.get(f"{secured.url}/v1/no-such-route", timeout=10)
    assert response.status_code == 404
    assert re.search(r"no-such-route|Not Found", response.text)


NOT_FOUND_PATHS = [
    "/v1/no-such-route",
    "/openapi/no-such-viewer",  # Litestar's OpenAPI router answers these itself, with an HTML page of its own
    "/openapi/no-such-viewer/deeper",
    "/openapi/no-such-schema.json",
    "/openapi/swagger/x",
    "/schema",  # Litestar's default documentation path, moved to /openapi here
    "/schema/swagger",
    "/schema/openapi.json",
]


@pytest.mark.parametrize("path", NOT_FOUND_PATHS)
def test_every_unknown_path_is_the_same_json_404(secured: Server, path: str) -> None:
    response = httpx.get(f"{secured.url}{path}", headers=ADMIN, timeout=10)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "not_found")
