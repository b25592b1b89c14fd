"""How a server starts: the bootstrap admin key, open mode on loopback, refusal on an exposed bind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from locopilot.cli import cli
from locopilot.gateway.auth import is_loopback
from locopilot.server import ServeRefused, check_exposure
from locopilot.settings import SettingsError, load_settings
from locopilot.store import keys
from locopilot.store.db import Database
from locopilot.store.keys import KeySpec
from tests.conftest import Server, free_port
from tests.security.conftest import ADMIN, ADMIN_KEY, assert_unauthorized, keyed_server


def serve_exits(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``locopilot serve`` expecting it to refuse; it must exit well within the timeout."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")}
    environ |= {
        "LOCOPILOT_DATA_DIR": str(tmp_path / "data"),
        "LOCOPILOT_MODELS_DIR": str(tmp_path / "models"),
        "LOCOPILOT_PORT": str(free_port()),
        "COLUMNS": "400",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "locopilot", "serve"], env=environ, capture_output=True, text=True, timeout=60
    )


# The bootstrap admin key


def test_admin_key_from_the_environment(secured: Server) -> None:
    assert httpx.get(f"{secured.url}/v1/admin/keys", headers=ADMIN, timeout=10).status_code == 200
    assert httpx.get(f"{secured.url}/v1/admin/keys", headers={"x-api-key": ADMIN_KEY}, timeout=10).status_code == 200
    assert_unauthorized(httpx.get(f"{secured.url}/v1/admin/keys", timeout=10))
    assert_unauthorized(
        httpx.get(f"{secured.url}/v1/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}x"}, timeout=10)
    )


def test_admin_key_from_a_file(tmp_path: Path) -> None:
    secret = "file-admin-key-" + "q" * 24
    key_file = tmp_path / "admin.key"
    key_file.write_text(f"  {secret}\n")
    key_file.chmod(0o600)
    server = Server(tmp_path / "server", {}, {"LOCOPILOT_ADMIN_KEY_FILE": str(key_file)}).start(path="/health")
    try:
        headers = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{server.url}/v1/engine/stats", headers=headers, timeout=10).status_code == 200
        assert_unauthorized(httpx.get(f"{server.url}/v1/engine/stats", timeout=10))
    finally:
        server.stop()
    assert secret not in server.log_path.read_text()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LOCOPILOT_ADMIN_KEY": "short"}, "LOCOPILOT_ADMIN_KEY"),
        ({"LOCOPILOT_ADMIN_KEY": "has a space in it, long"}, "LOCOPILOT_ADMIN_KEY"),
        ({"LOCOPILOT_ADMIN_KEY_FILE": "/nonexistent/admin.key"}, "LOCOPILOT_ADMIN_KEY_FILE"),
        ({"LOCOPILOT_ADMIN_KEY": "a" * 20, "LOCOPILOT_ADMIN_KEY_FILE": "/x"}, "LOCOPILOT_ADMIN_KEY_FILE"),
    ],
)
def test_bad_admin_key_settings_stop_startup(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert caught.value.variable == variable
    for value in env.values():
        if "/" not in value:
            assert value not in str(caught.value)
    result = serve_exits(tmp_path, **env)
    assert result.returncode == 2
    assert variable in result.stderr


def test_empty_admin_key_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="at least 16"):
        load_settings({"LOCOPILOT_ADMIN_KEY_FILE": str(empty)})


def test_config_masks_the_admin_key(tmp_path: Path) -> None:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LOCOPILOT_")}
    env |= {"LOCOPILOT_DATA_DIR": str(tmp_path), "LOCOPILOT_ADMIN_KEY": ADMIN_KEY, "COLUMNS": "250"}
    result = CliRunner().invoke(cli, ["config"], env=env, catch_exceptions=False)
    assert result.exit_code == 0
    assert ADMIN_KEY not in result.stdout
    assert "LOCOPILOT_ADMIN_KEY " in result.stdout
    assert "********" in result.stdout
    assert ADMIN_KEY not in repr(load_settings({"LOCOPILOT_ADMIN_KEY": ADMIN_KEY}))


# Exposed binds


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_exposed_bind_without_a_key_refuses_to_start(tmp_path: Path, host: str) -> None:
    started = time.monotonic()
    result = serve_exits(tmp_path, LOCOPILOT_HOST=host)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert f"refusing to listen on {host}" in message
    assert "no API key is configured" in message
    assert "locopilot keys create" in message
    assert "LOCOPILOT_ADMIN_KEY" in message
    assert "Listening" not in result.stdout + result.stderr  # granian never started
    assert time.monotonic() - started < 30


def exposed(tmp_path: Path, **env: str) -> None:
    check_exposure(load_settings({"LOCOPILOT_DATA_DIR": str(tmp_path), "LOCOPILOT_HOST": "0.0.0.0", **env}))


def test_exposed_bind_needs_a_working_key(tmp_path: Path) -> None:
    with pytest.raises(ServeRefused):
        exposed(tmp_path)
    exposed(tmp_path, LOCOPILOT_ADMIN_KEY=ADMIN_KEY)
    db = Database.open(tmp_path / "locopilot.db")
    try:
        key, _ = keys.create(db, KeySpec(name="only"), time.time())
        exposed(tmp_path)
        keys.revoke(db, key.id, time.time())
        with pytest.raises(ServeRefused):
            exposed(tmp_path)  # a revoked key lets nobody in: say so rather than start useless
        keys.create(db, KeySpec(name="later", expires="1m"), time.time())
        exposed(tmp_path)
    finally:
        db.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# Open mode


def test_open_mode_on_loopback_until_the_first_key(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", {}).start(path="/health")
    try:
        assert "WITHOUT AUTHENTICATION" in server.log()
        for headers in ({}, {"Authorization": "Bearer unused"}, {"Authorization": "Basic eA=="}):
            assert httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10).status_code == 200
            assert httpx.get(f"{server.url}/v1/engine/stats", headers=headers, timeout=10).status_code == 200
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LOCOPILOT_")}
        env |= {"LOCOPILOT_DATA_DIR": str(server.data_dir), "LOCOPILOT_MODELS_DIR": str(server.models_dir)}
        made = CliRunner().invoke(cli, ["keys", "create", "first"], env=env, catch_exceptions=False)
        assert made.exit_code == 0, made.stderr
        secret = made.stdout.strip()
        assert secret_required(server)
        headers = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10).status_code == 200
        revoked = CliRunner().invoke(cli, ["keys", "revoke", "first"], env=env, catch_exceptions=False)
        assert revoked.exit_code == 0
        time.sleep(1.5)
        # Revoking the last key locks the server; it never opens again.
        assert_unauthorized(httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10), secret)
        assert_unauthorized(httpx.get(f"{server.url}/v1/models", timeout=10))
    finally:
        server.stop()
    assert secret not in server.log_path.read_text()


def secret_required(server: Server, seconds: float = 10) -> bool:
    """Whether the server starts refusing requests without a key within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401:
            return True
        time.sleep(0.1)
    return False


def test_a_key_made_over_http_in_open_mode_ends_it_at_once(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", {}).start(path="/health")
    try:
        created = httpx.post(f"{server.url}/v1/admin/keys", json={"name": "boot", "scopes": ["admin"]}, timeout=10)
        assert created.status_code == 201
        assert_unauthorized(httpx.get(f"{server.url}/v1/admin/keys", timeout=10))
        headers = {"Authorization": f"Bearer {created.json()['secret']}"}
        assert httpx.get(f"{server.url}/v1/admin/keys", headers=headers, timeout=10).status_code == 200
    finally:
        server.stop()


def test_public_models_answer_without_a_key(tmp_path: Path) -> None:
    server = keyed_server(tmp_path / "server", {"LOCOPILOT_PUBLIC_MODELS": "true"})
    try:
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/v1/models/nope", timeout=10).status_code == 404
        # A key, if sent, must still be a real one; other routes still need one.
        assert_unauthorized(httpx.get(f"{server.url}/v1/models", headers={"x-api-key": "wrong"}, timeout=10))
        assert_unauthorized(httpx.post(f"{server.url}/v1/chat/completions", json={}, timeout=10))
        assert_unauthorized(httpx.get(f"{server.url}/v1/engine/health", timeout=10))
    finally:
        server.stop()
    assert "API keys are required" in server.log_path.read_text()
