"""The training routes need the ``training`` scope once keys exist: files and jobs alike."""

from __future__ import annotations

import httpx

from tests.conftest import Server
from tests.security.conftest import assert_forbidden, create_key


def test_training_routes_need_the_training_scope(secured: Server) -> None:
    inference = create_key(secured, name="no-training", scopes=["inference"])
    training = create_key(secured, name="trainer", scopes=["training"])
    for method, path in [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/locopilot/training/jobs"),
        ("GET", "/v1/locopilot/training/jobs/ftjob-x/logs"),
    ]:
        response = httpx.request(method, f"{secured.url}{path}", headers=inference.headers, timeout=10)
        assert_forbidden(response, "insufficient_scope")
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/locopilot/training/jobs"):
        response = httpx.get(f"{secured.url}{path}", headers=training.headers, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "list"
    refused = httpx.post(f"{secured.url}/v1/chat/completions", headers=training.headers, json={}, timeout=10)
    assert_forbidden(refused, "insufficient_scope")
