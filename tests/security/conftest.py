"""Servers that require API keys, and helpers to make and break keys through the admin API.

Each server has no model of its own: behind it are scripted fault upstreams on
loopback, ``cloud`` (remote) and ``lan`` (local), so every request it serves is
recorded and none needs llama.cpp.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import apsw
import httpx
import pytest
from litestar.exceptions import LitestarDeprecationWarning

from locopilot.app import create_app
from locopilot.errors import front_of
from locopilot.settings import load_settings
from tests.conftest import Server
from tests.fakes.fault_upstream import FaultUpstream

ADMIN_KEY = "test-admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
#: A body every POST route accepts far enough to reach its handler.
BODY = {"model": "fault-small", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}


def upstreams(cloud: FaultUpstream, lan: FaultUpstream) -> str:
    return json.dumps(
        [
            {"name": "cloud", "url": cloud.url, "locality": "remote", "priority": 30},
            {"name": "lan", "url": lan.url, "locality": "local", "priority": 20, "models": ["lan-model"]},
        ]
    )


def keyed_server(root: Path, env: dict[str, str] | None = None) -> Server:
    """A server with the bootstrap admin key (unless ``env`` overrides it), started and answering."""
    return Server(root, {}, {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY, **(env or {})}).start(path="/health")


@contextmanager
def cloud_server(root: Path, models: dict[str, Path], cloud: FaultUpstream, **env: str) -> Iterator[Server]:
    """A server of ``models`` beside the upstream ``cloud`` (serving its MODELS), with the bootstrap admin key
    and ``env``: started and answering in the block, stopped after it."""
    upstream = {"name": "cloud", "url": cloud.url, "models": list(cloud.MODELS)}
    env = {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY, "LOCOPILOT_UPSTREAMS": json.dumps([upstream]), **env}
    running = Server(root, models, env)
    try:
        yield running.start(path="/health")
    finally:
        running.stop()


@pytest.fixture(scope="package")
def cloud() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="package")
def lan() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="package")
def secured(tmp_path_factory: pytest.TempPathFactory, cloud: FaultUpstream, lan: FaultUpstream) -> Iterator[Server]:
    """One shared keyed server in front of ``cloud`` and ``lan``."""
    running = keyed_server(tmp_path_factory.mktemp("secured"), {"LOCOPILOT_UPSTREAMS": upstreams(cloud, lan)})
    yield running
    running.stop()


@dataclass(frozen=True)
class Key:
    id: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def create_key(server: Server, **spec: Any) -> Key:
    """A new key made through ``POST /v1/admin/keys`` with the admin key."""
    response = httpx.post(f"{server.url}/v1/admin/keys", json=spec, headers=ADMIN, timeout=10)
    assert response.status_code == 201, response.text
    body = response.json()
    return Key(body["id"], body["secret"])


def revoke_key(server: Server, key: Key) -> None:
    response = httpx.delete(f"{server.url}/v1/admin/keys/{key.id}", headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "revoked"


def expire_key(server: Server, key: Key) -> None:
    """Move the key's expiry into the past, as another process writing the database would."""
    conn = apsw.Connection(str(server.db_path))
    try:
        conn.set_busy_timeout(5000)
        conn.execute("UPDATE api_keys SET expires_at = 1.0 WHERE id = ?", (key.id,))
        assert conn.changes() == 1
    finally:
        conn.close()


def audit_events(server: Server, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/v1/admin/audit", params={"limit": "1000", **params}, headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["data"]
    return events


# Every route of the app, from the app itself


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # as the auth table names it: /v1/models/{model_id}

    @property
    def path(self) -> str:
        """A concrete path: each parameter filled with a harmless value."""
        return re.sub(r"\{[^}]+\}", "x", self.template)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def app_routes() -> list[Route]:
    """Every method and path the app answers (OpenAPI viewers included), OPTIONS aside."""
    with warnings.catch_warnings():
        # Litestar's notes about inferred dependencies are for the handlers' authors, not this list.
        warnings.simplefilter("ignore", LitestarDeprecationWarning)
        app = create_app(load_settings({"LOCOPILOT_DATA_DIR": "/nonexistent"}))
    routes = set()
    for route in app.routes:
        template = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in getattr(route, "methods", ()):
            if method not in ("OPTIONS", "HEAD"):
                routes.add(Route(method, template))
    return sorted(routes, key=str)


def request(server: Server, route: Route, headers: dict[str, str] | None = None) -> httpx.Response:
    body = BODY if route.method in ("POST", "PUT", "PATCH") else None
    return httpx.request(route.method, f"{server.url}{route.path}", json=body, headers=headers, timeout=30)


def assert_unauthorized(response: httpx.Response, secret: str | None = None) -> None:
    """401 in the shape of the route's API (OpenAI's, Anthropic's on /v1/messages, or Ollama's
    ``{"error": "..."}`` under ``/api``) with a Bearer challenge; the presented key is nowhere in it."""
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    front = front_of(response.request.url.path)
    if front == "anthropic":
        assert response.json() == {"type": "error", "error": {"type": "authentication_error", "message": ANY}}
    elif front == "ollama":
        error = response.json()["error"]
        assert isinstance(error, str) and "API key" in error
    else:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_api_key"
    if secret:
        assert secret not in response.text
        assert secret not in str(response.headers)


def assert_forbidden(response: httpx.Response, code: str) -> None:
    """403 with ``code`` in OpenAI's shape; Anthropic's (/v1/messages) has no code, only its type;
    under ``/api`` Ollama's shape has a message alone (``{"error": "..."}``)."""
    assert response.status_code == 403, response.text
    if front_of(response.request.url.path) == "anthropic":
        assert response.json() == {"type": "error", "error": {"type": "permission_error", "message": ANY}}
        return
    error = response.json()["error"]
    if front_of(response.request.url.path) == "ollama":
        assert isinstance(error, str)
        return
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


def error_message(response: httpx.Response) -> str:
    """The error's message, in OpenAI's shape, Anthropic's or Ollama's."""
    error = response.json()["error"]
    return error if isinstance(error, str) else str(error["message"])
