"""``locopilot expose`` with stand-in tunnel programs on PATH (tests/fakes/tunnel.py), against a real server.

Nothing leaves 127.0.0.1: the stand-ins print what cloudflared, ``tailscale funnel`` and an ssh
reverse tunnel print, and the test sends the tunnel's Host header to the server itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Server

ADMIN_KEY = "sk-expose-admin-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAKE = ROOT / "tests" / "fakes" / "tunnel.py"
NAME = "quiet-river-4821"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("expose"), {}, {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY}).start(path="/health")
    yield running
    running.stop()


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for program in ("cloudflared", "tailscale", "ssh"):
        (folder / program).symlink_to(FAKE)
    return folder


def expose_env(server: Server, bin_dir: Path, log: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")}
    return env | {
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "LOCOPILOT_PORT": str(server.port),
        "LOCOPILOT_ADMIN_KEY": server.env.get("LOCOPILOT_ADMIN_KEY", ""),
        "XDG_CONFIG_HOME": str(log.parent / "config"),  # no service env file of this machine
        "FAKE_TUNNEL_LOG": str(log),
        "FAKE_TUNNEL_NAME": NAME,
        **extra,
    }


def start_expose(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "locopilot", "expose", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(process: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    """The first line of the command's output that starts with ``prefix``."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    process.kill()
    raise AssertionError(f"no line starting {prefix!r}; stderr:\n{process.communicate()[1]}")


def as_tunnel(server: Server, host: str) -> httpx.Response:
    """A request as the tunnel forwards it: to the server on loopback, Host naming the public name."""
    return httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Host": host}, timeout=10)


def log_entries(log: Path) -> list[object]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


CASES = {
    "cloudflared": (f"https://{NAME}.trycloudflare.com", lambda origin: ["tunnel", "--no-autoupdate", "--url", origin]),
    "tailscale": (f"https://{NAME}.tail1a2b3c.ts.net", lambda origin: ["funnel", origin]),
    "ssh": (
        f"https://{NAME}.lhr.life",
        lambda origin: [
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ServerAliveInterval=30",
            "-R",
            f"80:127.0.0.1:{origin.rsplit(':', 1)[1]}",
            "nokey@localhost.run",
        ],
    ),
}


@pytest.mark.parametrize("provider", sorted(CASES))
def test_expose_allows_the_tunnel_host_until_ctrl_c(
    server: Server, bin_dir: Path, tmp_path: Path, provider: str
) -> None:
    public, argv = CASES[provider]
    host = public.removeprefix("https://")
    log = tmp_path / "tunnel.log"
    assert as_tunnel(server, host).status_code == 403  # before: the Host check refuses the name
    process = start_expose(expose_env(server, bin_dir, log), "--provider", provider)
    try:
        assert read_until(process, "Published at") == f"Published at {public}"
        assert read_until(process, "OpenAI-compatible") == (
            f"OpenAI-compatible clients: base URL {public}/v1 with an API key"
        )
        started = log_entries(log)[0]
        assert started == {"program": provider, "args": argv(server.url), "pid": started["pid"]}  # type: ignore[index]
        assert as_tunnel(server, host).status_code == 200
        assert as_tunnel(server, f"{host}:443").status_code == 200
        assert as_tunnel(server, "other.trycloudflare.com").status_code == 403
        listed = httpx.get(f"{server.url}/v1/admin/hosts", headers=AUTH).json()
        assert listed["added"] == [host] and listed["checked"] and listed["keys_required"]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "Tunnel stopped." in out
    assert log_entries(log)[-1] == "stopped"  # the tunnel program was stopped, not left behind
    refused = as_tunnel(server, host)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{server.url}/v1/admin/hosts", headers=AUTH).json()["added"] == []


def test_expose_ends_when_the_tunnel_exits(server: Server, bin_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "tunnel.log"
    process = start_expose(expose_env(server, bin_dir, log, FAKE_TUNNEL_EXIT="3"))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"Published at https://{NAME}.trycloudflare.com" in out
    assert "the tunnel program exited with status 3" in err
    assert "connection to the edge lost" in err  # its last lines say why
    assert as_tunnel(server, f"{NAME}.trycloudflare.com").status_code == 403


def test_expose_reports_a_tunnel_that_never_names_a_url(server: Server, bin_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "tunnel.log"
    env = expose_env(server, bin_dir, log, FAKE_TUNNEL_EXIT="1", FAKE_TUNNEL_SILENT="1")
    process = start_expose(env, "--provider", "tailscale")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "Published" not in out
    assert "before it named a public URL, exited with status 1" in err
    assert "Funnel is not enabled" in err


def test_expose_needs_the_program_on_path(server: Server, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = expose_env(server, empty, tmp_path / "tunnel.log") | {"PATH": str(empty)}
    process = subprocess.run(
        [sys.executable, "-m", "locopilot", "expose", "--provider", "ssh"], env=env, capture_output=True, text=True
    )
    assert process.returncode == 1
    assert "ssh is not on PATH" in process.stderr


def test_expose_refuses_a_server_without_keys(tmp_path: Path, bin_dir: Path) -> None:
    open_server = Server(tmp_path / "open", {}).start(path="/health")
    try:
        log = tmp_path / "tunnel.log"
        process = start_expose(expose_env(open_server, bin_dir, log))
        _, err = process.communicate(timeout=60)
        assert process.returncode == 1
        assert "answers without an API key" in err
        assert not log.exists()  # no tunnel program was started
        # The route refuses too, whoever calls it.
        refused = httpx.post(f"{open_server.url}/v1/admin/hosts", json={"host": "x.trycloudflare.com"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "server_open"
        assert as_tunnel(open_server, "x.trycloudflare.com").status_code == 403
    finally:
        open_server.stop()


@pytest.mark.parametrize("host", ["https://a.example", "a.example:443", "a..example", "-a.example", "a_b.example", ""])
def test_add_host_refuses_what_is_not_a_name(server: Server, host: str) -> None:
    answer = httpx.post(f"{server.url}/v1/admin/hosts", json={"host": host}, headers=AUTH)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "host"


def test_hosts_need_the_admin_key(server: Server) -> None:
    assert httpx.post(f"{server.url}/v1/admin/hosts", json={"host": "a.example"}).status_code == 401
    assert httpx.delete(f"{server.url}/v1/admin/hosts/a.example", headers=AUTH).status_code == 404
    audit = httpx.get(f"{server.url}/v1/admin/audit", params={"event": "host_added"}, headers=AUTH).json()
    assert all(event["detail"]["host"] for event in audit["data"])


def test_expose_through_serveo(server: Server, bin_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "tunnel.log"
    process = start_expose(expose_env(server, bin_dir, log), "--provider", "ssh", "--ssh-target", "serveo.net")
    try:
        assert read_until(process, "Published at") == f"Published at https://{NAME}.serveo.net"
        assert log_entries(log)[0]["args"][-1] == "serveo.net"  # type: ignore[index]
        assert as_tunnel(server, f"{NAME}.serveo.net").status_code == 200
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert as_tunnel(server, f"{NAME}.serveo.net").status_code == 403
