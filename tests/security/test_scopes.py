"""Scopes: a key reaches the routes its scopes name and gets 403 on the others."""

from __future__ import annotations

import httpx
import pytest

from locopilot.gateway.auth import ROUTE_SCOPES
from tests.conftest import Server
from tests.security.conftest import (
    ADMIN,
    Key,
    Route,
    app_routes,
    assert_forbidden,
    audit_events,
    create_key,
    error_message,
    request,
)

SCOPES = ("inference", "models", "training", "admin")
DECIDED = [route for route in app_routes() if str(route) in ROUTE_SCOPES]


@pytest.fixture(scope="module")
def one_scope_keys(secured: Server) -> dict[str, Key]:
    return {scope: create_key(secured, name=f"only-{scope}", scopes=[scope]) for scope in SCOPES}


@pytest.mark.parametrize("route", DECIDED, ids=str)
def test_each_route_admits_its_scope_and_refuses_the_others(
    secured: Server, one_scope_keys: dict[str, Key], route: Route
) -> None:
    needed = ROUTE_SCOPES[str(route)]
    for scope, key in one_scope_keys.items():
        response = request(secured, route, key.headers)
        if scope == needed or needed is None:  # None: any valid key (GET /v1/locopilot/me)
            assert response.status_code not in (401, 403), (scope, response.text)
        else:
            assert_forbidden(response, "insufficient_scope")
            assert str(needed) in error_message(response)


def test_documentation_needs_a_key_of_any_scope(secured: Server, one_scope_keys: dict[str, Key]) -> None:
    for key in one_scope_keys.values():
        response = httpx.get(f"{secured.url}/openapi/openapi.json", headers=key.headers, timeout=10)
        assert response.status_code == 200


def test_inference_key_serves_a_chat(secured: Server, one_scope_keys: dict[str, Key]) -> None:
    response = httpx.post(
        f"{secured.url}/v1/chat/completions",
        json={"model": "lan-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=one_scope_keys["inference"].headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-locopilot-provider"] == "lan"


def test_default_scope_is_inference_only(secured: Server) -> None:
    created = httpx.post(f"{secured.url}/v1/admin/keys", json={"name": "plain"}, headers=ADMIN, timeout=10).json()
    assert created["scopes"] == ["inference"]
    headers = {"Authorization": f"Bearer {created['secret']}"}
    assert httpx.get(f"{secured.url}/v1/models", headers=headers, timeout=10).status_code == 200
    assert_forbidden(httpx.get(f"{secured.url}/v1/admin/keys", headers=headers, timeout=10), "insufficient_scope")


def test_an_inference_key_cannot_make_itself_an_admin(secured: Server, one_scope_keys: dict[str, Key]) -> None:
    response = httpx.post(
        f"{secured.url}/v1/admin/keys",
        json={"name": "escalated", "scopes": ["admin"]},
        headers=one_scope_keys["inference"].headers,
        timeout=10,
    )
    assert_forbidden(response, "insufficient_scope")
    names = [k["name"] for k in httpx.get(f"{secured.url}/v1/admin/keys", headers=ADMIN, timeout=10).json()["data"]]
    assert "escalated" not in names


def test_refusals_are_audited(secured: Server, one_scope_keys: dict[str, Key]) -> None:
    key = one_scope_keys["training"]
    assert_forbidden(httpx.get(f"{secured.url}/v1/engine/stats", headers=key.headers, timeout=10), "insufficient_scope")
    events = [e for e in audit_events(secured, event="forbidden") if e["key_id"] == key.id]
    assert any(e["path"] == "/v1/engine/stats" and e["detail"] == {"reason": "scope", "scope": "admin"} for e in events)
    assert all(e["status"] == 403 for e in events)
