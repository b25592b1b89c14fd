"""The admin API for keys: the secret once, a list without it, revocation, and the audit trail."""

from __future__ import annotations

import httpx

from tests.conftest import Server
from tests.security.conftest import ADMIN, assert_unauthorized, audit_events, create_key


def admin(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=ADMIN, timeout=10, **kwargs)  # type: ignore[arg-type]


def test_create_shows_the_secret_once(secured: Server) -> None:
    spec = {
        "name": "ci-runner",
        "scopes": ["models", "inference"],
        "models": ["fault-small", "cloud:*"],
        "privacy": "local_only",
        "rpm": 60,
        "tpm": 10000,
        "expires": "30d",
    }
    response = admin(secured, "POST", "/v1/admin/keys", json=spec)
    assert response.status_code == 201, response.text
    created = response.json()
    secret = created["secret"]
    assert secret.startswith("lcp_")
    assert len(secret) >= 40
    assert created["prefix"] == secret[:10]
    assert created["scopes"] == ["inference", "models"]
    assert created["models"] == ["fault-small", "cloud:*"]
    assert created["privacy"] == "local_only"
    assert (created["rpm"], created["tpm"]) == (60, 10000)
    assert created["expires_at"] - created["created_at"] == 30 * 86400
    assert created["state"] == "active"

    listed = admin(secured, "GET", "/v1/admin/keys")
    assert listed.status_code == 200
    assert secret not in listed.text
    assert secret[10:20] not in listed.text
    mine = [k for k in listed.json()["data"] if k["id"] == created["id"]]
    assert len(mine) == 1
    assert "secret" not in mine[0]
    assert "hash" not in mine[0]
    one = admin(secured, "GET", f"/v1/admin/keys/{created['id']}")
    assert one.status_code == 200
    assert secret not in one.text
    assert admin(secured, "GET", "/v1/admin/keys/ci-runner").json()["id"] == created["id"]


def test_revoke(secured: Server) -> None:
    key = create_key(secured, name="to-revoke")
    assert httpx.get(f"{secured.url}/v1/models", headers=key.headers, timeout=10).status_code == 200
    first = admin(secured, "DELETE", f"/v1/admin/keys/{key.id}")
    assert first.status_code == 200
    assert first.json()["state"] == "revoked"
    assert_unauthorized(httpx.get(f"{secured.url}/v1/models", headers=key.headers, timeout=10), key.secret)
    again = admin(secured, "DELETE", f"/v1/admin/keys/{key.id}")
    assert again.json()["revoked_at"] == first.json()["revoked_at"]
    # The name is free again.
    assert create_key(secured, name="to-revoke").id != key.id


def test_refusals(secured: Server) -> None:
    create_key(secured, name="taken")
    taken = admin(secured, "POST", "/v1/admin/keys", json={"name": "taken"})
    assert taken.status_code == 400
    assert taken.json()["error"]["code"] == "key_name_taken"
    for spec in (
        {"name": "x", "scopes": ["root"]},
        {"name": "x", "scopes": []},
        {"name": "bad name"},
        {"name": "x", "privacy": "nowhere"},
        {"name": "x", "rpm": 0},
        {"name": "x", "expires": "yesterday"},
        {"name": "x", "expires": "2001-01-01"},
        {"name": "x", "scope": ["admin"]},  # a typo is refused, not ignored
        {"name": "x", "models": []},
    ):
        response = admin(secured, "POST", "/v1/admin/keys", json=spec)
        assert response.status_code == 400, (spec, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    missing = admin(secured, "DELETE", "/v1/admin/keys/key_0000000000000000")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "key_not_found"


def test_admin_actions_are_audited_without_secrets(secured: Server) -> None:
    response = admin(secured, "POST", "/v1/admin/keys", json={"name": "audited"})
    created = response.json()
    admin(secured, "DELETE", f"/v1/admin/keys/{created['id']}")
    admin(secured, "POST", "/v1/admin/keys", json={"name": "bad name"})
    events = audit_events(secured)
    assert created["secret"] not in str(events)
    made = [e for e in events if e["event"] == "key_created" and e["detail"]["key"] == created["id"]]
    assert len(made) == 1
    assert made[0]["key_id"] == "admin"  # who acted: the bootstrap admin key
    assert made[0]["status"] == 201
    assert made[0]["detail"]["name"] == "audited"
    revoked = [e for e in events if e["event"] == "key_revoked" and e["detail"]["key"] == created["id"]]
    assert len(revoked) == 1
    assert revoked[0]["method"] == "DELETE"
    failed = [e for e in events if e["event"] == "admin_action" and e["status"] == 400]
    assert failed
    assert failed[0]["path"] == "/v1/admin/keys"


def test_audit_view_filters_and_bounds(secured: Server) -> None:
    assert admin(secured, "GET", "/v1/admin/audit", params={"limit": "0"}).status_code == 400
    assert admin(secured, "GET", "/v1/admin/audit", params={"limit": "100000"}).status_code == 400
    events = admin(secured, "GET", "/v1/admin/audit", params={"event": "key_created", "limit": "2"}).json()["data"]
    assert 0 < len(events) <= 2
    assert {e["event"] for e in events} == {"key_created"}
    assert events[0]["id"] > events[-1]["id"]  # newest first
