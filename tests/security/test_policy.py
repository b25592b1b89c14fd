"""Per-key policy: a privacy pin a header cannot loosen, and a model allowlist.

``cloud`` is a remote upstream and ``lan`` a local one (see conftest); each records
every request it gets, so "never reached the remote" is checked at the remote.
"""

from __future__ import annotations

import json
import time
from typing import Any

import apsw
import httpx
import pytest

from tests.conftest import Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import Key, assert_forbidden, audit_events, create_key

QUESTION = [{"role": "user", "content": "hi"}]


def generations(upstream: FaultUpstream) -> int:
    return len([r for r in upstream.requests if r.method == "POST"])


def chat(server: Server, key: Key, model: str, privacy: str | None = None, **extra: Any) -> httpx.Response:
    headers = key.headers | ({"X-Routing-Privacy": privacy} if privacy else {})
    body = {"model": model, "messages": QUESTION, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def log_rows(server: Server, key: Key) -> list[dict[str, Any]]:
    """This key's request log rows, once the server's writer has committed them."""
    for _ in range(100):
        conn = apsw.Connection(str(server.db_path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            cursor = conn.cursor()
            cursor.row_trace = lambda c, row: dict(zip((d[0] for d in c.getdescription()), row, strict=True))
            rows: list[dict[str, Any]] = list(
                cursor.execute("SELECT * FROM inference_logs WHERE key_id = ?", (key.id,))
            )
        finally:
            conn.close()
        if rows:
            return rows
        time.sleep(0.05)
    return []


# Privacy pin


@pytest.fixture(scope="module")
def pinned(secured: Server) -> Key:
    return create_key(secured, name="pinned-local", privacy="local_only")


@pytest.fixture(scope="module")
def unpinned(secured: Server) -> Key:
    return create_key(secured, name="unpinned")


def test_unpinned_key_reaches_the_remote(secured: Server, cloud: FaultUpstream, unpinned: Key) -> None:
    """The control: the remote does serve this model to a key without a pin."""
    before = generations(cloud)
    response = chat(secured, unpinned, "fault-small", "any")
    assert response.status_code == 200, response.text
    assert response.headers["x-locopilot-provider"] == "cloud"
    assert generations(cloud) == before + 1


@pytest.mark.parametrize("privacy", [None, "any", "local_preferred", "local_only"])
def test_pinned_key_never_reaches_the_remote(
    secured: Server, cloud: FaultUpstream, pinned: Key, privacy: str | None
) -> None:
    before = generations(cloud)
    response = chat(secured, pinned, "fault-small", privacy)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    streamed = chat(secured, pinned, "fault-small", privacy, stream=True)
    assert streamed.status_code == 404
    embedded = httpx.post(
        f"{secured.url}/v1/embeddings",
        json={"model": "fault-small", "input": "hi"},
        headers=pinned.headers | ({"X-Routing-Privacy": privacy} if privacy else {}),
        timeout=30,
    )
    assert embedded.status_code == 404
    explicit = chat(secured, pinned, "cloud:fault-small", privacy)
    assert_forbidden(explicit, "privacy_policy")
    assert generations(cloud) == before


def test_pinned_key_is_served_locally(secured: Server, lan: FaultUpstream, pinned: Key) -> None:
    before = generations(lan)
    response = chat(secured, pinned, "lan-model", "any")
    assert response.status_code == 200, response.text
    assert response.headers["x-locopilot-provider"] == "lan"
    assert generations(lan) == before + 1
    rows = log_rows(secured, pinned)
    served = [r for r in rows if r["status"] == "ok"]
    assert served
    assert json.loads(served[-1]["routing"])["policy"] == "local_only"  # the pin, not the header


def test_a_stricter_header_still_applies(secured: Server, cloud: FaultUpstream) -> None:
    key = create_key(secured, name="pinned-preferred", privacy="local_preferred")
    before = generations(cloud)
    assert chat(secured, key, "fault-small", "local_only").status_code == 404
    assert generations(cloud) == before
    assert chat(secured, key, "fault-small", "any").status_code == 200  # local_preferred may fall back
    assert generations(cloud) == before + 1


# Model allowlist


def test_allowlist_of_plain_names(secured: Server, cloud: FaultUpstream) -> None:
    key = create_key(secured, name="lan-only", models=["lan-model"])
    assert chat(secured, key, "lan-model").status_code == 200
    before = generations(cloud)
    for model in ("fault-small", "cloud:fault-small", "no-such-model-anywhere", "default"):
        assert_forbidden(chat(secured, key, model, "any"), "model_not_allowed")
    assert generations(cloud) == before
    # An alias resolves among the allowed models only.
    auto = chat(secured, key, "auto", "any")
    assert auto.status_code == 200
    assert auto.headers["x-locopilot-model"] == "lan-model"
    listed = httpx.get(f"{secured.url}/v1/models", headers=key.headers, timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["lan-model"]
    assert httpx.get(f"{secured.url}/v1/models/fault-small", headers=key.headers, timeout=10).status_code == 404
    assert httpx.get(f"{secured.url}/v1/models/lan-model", headers=key.headers, timeout=10).status_code == 200
    refusals = [e for e in audit_events(secured, event="forbidden") if e["key_id"] == key.id]
    assert {e["detail"]["model"] for e in refusals} >= {"fault-small", "cloud:fault-small"}
    assert all(e["detail"]["reason"] == "model" for e in refusals)


def test_allowlist_entry_pins_a_provider(secured: Server) -> None:
    key = create_key(secured, name="cloud-small", models=["cloud:fault-small"])
    for model in ("fault-small", "cloud:fault-small", "cloud/fault-small"):
        response = chat(secured, key, model, "any")
        assert response.status_code == 200, (model, response.text)
        assert response.headers["x-locopilot-provider"] == "cloud"
    for model in ("fault-large", "lan:fault-small", "lan-model"):
        assert_forbidden(chat(secured, key, model, "any"), "model_not_allowed")
    listed = httpx.get(f"{secured.url}/v1/models", headers=key.headers, timeout=10).json()["data"]
    assert [(m["provider"], m["id"]) for m in listed] == [("cloud", "fault-small")]


def test_allowlist_wildcard_for_one_provider(secured: Server) -> None:
    key = create_key(secured, name="all-cloud", models=["cloud:*"])
    assert chat(secured, key, "fault-large", "any").status_code == 200
    assert chat(secured, key, "fault-small", "any").status_code == 200
    assert_forbidden(chat(secured, key, "lan-model", "any"), "model_not_allowed")


def test_allowed_but_missing_model_is_404(secured: Server) -> None:
    key = create_key(secured, name="ghostly", models=["ghost"])
    response = chat(secured, key, "ghost")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_request_log_names_the_key(secured: Server, unpinned: Key) -> None:
    response = chat(secured, unpinned, "lan-model")
    assert response.status_code == 200
    rows = log_rows(secured, unpinned)
    assert any(r["request_id"] == response.json()["id"] for r in rows)
    refused = httpx.post(
        f"{secured.url}/v1/chat/completions", json={"model": "lan-model"}, headers=unpinned.headers, timeout=10
    )
    assert refused.status_code == 400
    for _ in range(100):
        if any(r["http_status"] == 400 for r in log_rows(secured, unpinned)):
            break
        time.sleep(0.05)
    assert any(r["http_status"] == 400 for r in log_rows(secured, unpinned))
