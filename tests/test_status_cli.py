"""``locopilot status`` and ``locopilot usage`` against a real server with keys, one model and a dead upstream."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner, Result

from locopilot.cli import cli
from tests.conftest import SMOL, Server, free_port

ADMIN_KEY = "sk-status-admin-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    dead = [
        {
            "name": "gpu9",
            "url": f"http://127.0.0.1:{free_port()}/v1",
            "locality": "local",
            "priority": 7,
            "models": ["big-one"],
        }
    ]
    env = {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY, "LOCOPILOT_UPSTREAMS": json.dumps(dead)}
    running = Server(tmp_path_factory.mktemp("status"), {SMOL: smollm2_path}, env).start(path="/health")
    yield running
    running.stop()


def key_file(server: Server, tmp_path: Path, name: str, scopes: list[str]) -> Path:
    created = httpx.post(f"{server.url}/v1/admin/keys", json={"name": name, "scopes": scopes}, headers=ADMIN).json()
    path = tmp_path / f"{name}.key"
    path.write_text(created["secret"])
    return path


def run(server: Server, tmp_path: Path, *args: str, code: int = 0) -> Result:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LOCOPILOT_")}
    env |= {
        "LOCOPILOT_PORT": str(server.port),
        "LOCOPILOT_ADMIN_KEY": ADMIN_KEY,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "COLUMNS": "250",
        "NO_COLOR": "1",
    }
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def rows(output: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in output.splitlines() if line.strip()}


def test_status_shows_engine_models_and_providers(server: Server, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    out = run(server, tmp_path, "status").stdout
    table = rows(out)
    assert table["server"] == [server.url, "ok"]
    assert table["database"][-1] == "ok"
    assert table["llama.cpp"][-1] == "ok"
    assert table[SMOL][0] == "2048"  # the loaded model and its context
    assert table["embedded"][:3] == ["local", "0", "closed"]
    assert table["gpu9"][:2] == ["local", "7"]
    assert "big-one" in table["gpu9"]


def test_status_needs_the_admin_scope(server: Server, tmp_path: Path) -> None:
    plain = key_file(server, tmp_path, "plain-status", ["inference"])
    result = run(server, tmp_path, "status", "--key-file", str(plain), code=1)
    assert "admin" in result.stderr and "HTTP 403" in result.stderr


def test_status_without_a_server(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["status", "--url", f"http://127.0.0.1:{free_port()}"], env={"XDG_CONFIG_HOME": str(tmp_path)}
    )
    assert result.exit_code == 1
    assert "status needs a running server" in result.stderr


def test_usage_shows_this_keys_requests(server: Server, tmp_path: Path) -> None:
    path = key_file(server, tmp_path, "alice", ["inference"])
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=path.read_text(), max_retries=0)
    answers = [
        client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        for _ in range(2)
    ]
    tokens_in = sum(a.usage.prompt_tokens for a in answers if a.usage)
    tokens_out = sum(a.usage.completion_tokens for a in answers if a.usage)
    out = run(server, tmp_path, "usage", "--key-file", str(path)).stdout
    assert out.startswith("key: alice (key_")
    assert "scopes: inference" in out
    table = rows(out)
    assert table[SMOL] == ["2", "0", str(tokens_in), str(tokens_out)]
    assert table["total"] == ["2", "0", str(tokens_in), str(tokens_out)]
    # Every key's, with the admin key: alice's row is there; alice may not see it.
    everyone = run(server, tmp_path, "usage", "--all").stdout
    assert ["alice", SMOL, "2", "0", str(tokens_in), str(tokens_out)] in [
        line.split() for line in everyone.splitlines()
    ]
    refused = run(server, tmp_path, "usage", "--all", "--key-file", str(path), code=1)
    assert "HTTP 403" in refused.stderr
