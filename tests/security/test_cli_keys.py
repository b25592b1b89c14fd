"""``locopilot keys``: create, list and revoke against the data folder, the secret shown once."""

from __future__ import annotations

import re
from pathlib import Path

import apsw
import httpx
import pytest

from tests.conftest import Server
from tests.security.conftest import ADMIN_KEY, assert_unauthorized, create_key, keyed_server
from tests.test_cli import Env, invoke, make_env

SECRET = re.compile(r"^lcp_[A-Za-z0-9_-]{43}$")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def create(env: Env, *args: str) -> str:
    result = invoke(env, "keys", "create", *args)
    secret = result.stdout.strip()
    assert SECRET.match(secret), result.stdout
    assert "cannot be shown again" in result.stderr
    assert secret not in result.stderr
    return secret


def database_bytes(data_dir: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(data_dir.glob("locopilot.db*")))


def test_create_list_revoke(env: Env, tmp_path: Path) -> None:
    assert "no keys" in invoke(env, "keys", "list").stdout
    secret = create(
        env,
        "ci",
        "--scope",
        "inference,models",
        "--models",
        "smol",
        "--models",
        "ollama:*",
        "--privacy",
        "local_only",
        "--rpm",
        "60",
        "--tpm",
        "5000",
        "--expires",
        "2099-01-31",
    )
    other = create(env, "plain")
    listed = invoke(env, "keys", "list").stdout
    assert secret not in listed
    assert secret[10:] not in listed
    row = next(line for line in listed.splitlines() if " ci " in line)
    assert secret[:10] + "…" in row
    for text in ("inference,models", "smol,ollama:*", "local_only", "60", "5000", "2099-01-31", "active"):
        assert text in row, text
    plain = next(line for line in listed.splitlines() if " plain " in line)
    assert "inference " in plain
    assert " all " in plain

    assert "revoked" in invoke(env, "keys", "revoke", "ci").stdout
    row = next(line for line in invoke(env, "keys", "list").stdout.splitlines() if " ci " in line)
    assert "revoked" in row
    assert "No API key" in invoke(env, "keys", "revoke", "ci", code=1).stderr  # no live key has that name now
    key_id = row.split()[0]
    assert "revoked" in invoke(env, "keys", "revoke", key_id).stdout  # by id, again: still revoked

    stored = database_bytes(tmp_path / "data")
    for one in (secret, other):
        assert one.encode() not in stored
        assert one[10:].encode() not in stored


def test_refusals(env: Env) -> None:
    assert "unknown scope root" in invoke(env, "keys", "create", "x", "--scope", "root", code=2).stderr
    assert "name" in invoke(env, "keys", "create", "bad name", code=2).stderr
    assert "in the past" in invoke(env, "keys", "create", "x", "--expires", "2001-01-01", code=1).stderr
    assert "duration" in invoke(env, "keys", "create", "x", "--expires", "soon", code=1).stderr
    create(env, "x")
    assert "already named" in invoke(env, "keys", "create", "x", code=1).stderr
    assert "No API key" in invoke(env, "keys", "revoke", "nobody", code=1).stderr
    assert "cloud" in " ".join(invoke(env, "keys", "create", "y", "--privacy", "cloud", code=2).stderr.split())


def test_cli_changes_are_audited(env: Env, tmp_path: Path) -> None:
    secret = create(env, "audited")
    invoke(env, "keys", "revoke", "audited")
    conn = apsw.Connection(str(tmp_path / "data" / "locopilot.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = list(conn.execute("SELECT event, client, detail FROM audit_events ORDER BY id"))
    finally:
        conn.close()
    assert [(event, client) for event, client, _ in rows] == [("key_created", "cli"), ("key_revoked", "cli")]
    assert all('"name":"audited"' in detail for _, _, detail in rows)
    assert secret not in str(rows)


def test_keys_from_the_cli_work_on_a_running_server(tmp_path: Path) -> None:
    server: Server = keyed_server(tmp_path / "server")
    try:
        env = make_env(tmp_path) | {
            "LOCOPILOT_DATA_DIR": str(server.data_dir),
            "LOCOPILOT_MODELS_DIR": str(server.models_dir),
        }
        secret = create(env, "live", "--scope", "admin")
        headers = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{server.url}/v1/engine/stats", headers=headers, timeout=10).status_code == 200
        invoke(env, "keys", "revoke", "live")
        assert_unauthorized(httpx.get(f"{server.url}/v1/engine/stats", headers=headers, timeout=10), secret)
    finally:
        server.stop()


def test_chat_sends_a_key(tmp_path: Path, secured: Server) -> None:
    env = make_env(tmp_path)
    question = ["chat", "--url", secured.url, "--model", "lan-model", "hi"]
    assert "Missing API key" in " ".join(invoke(env, *question, code=1).stderr.split())
    key_file = tmp_path / "key"
    key_file.write_text(create_key(secured, name="chatty").secret + "\n")
    assert "Hello from fault upstream" in invoke(env, *question, "--key-file", str(key_file)).stdout
    # Without a file, the bootstrap admin key from the environment (as the server has it).
    assert "Hello from fault upstream" in invoke(make_env(tmp_path, ADMIN_KEY=ADMIN_KEY), *question).stdout
