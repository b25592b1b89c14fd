"""Optional TLS: with a certificate and key, the server speaks HTTPS only, and a client that verifies
against that certificate gets through."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from locopilot.settings import SettingsError, load_settings
from tests.conftest import Server
from tests.security.conftest import ADMIN, ADMIN_KEY


def self_signed(folder: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_with_a_verified_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    env = {"LOCOPILOT_ADMIN_KEY": ADMIN_KEY, "LOCOPILOT_TLS_CERT": str(cert), "LOCOPILOT_TLS_KEY": str(key)}
    server = Server(tmp_path / "server", {}, env)
    https = f"https://127.0.0.1:{server.port}"
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "locopilot", "serve"], env=server.env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as client:
            deadline = time.monotonic() + 120
            while True:
                assert server.process.poll() is None, server.log()
                try:
                    if client.get(f"{https}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
            models = client.get(f"{https}/v1/models", headers=ADMIN)
            assert models.status_code == 200, models.text
            assert models.json()["object"] == "list"
        # Plain HTTP on the same port gets no answer, and a client that checks against the system store refuses.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{https}/health", timeout=10)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LOCOPILOT_TLS_CERT": "cert.pem"}, "LOCOPILOT_TLS_KEY"),
        ({"LOCOPILOT_TLS_KEY": "key.pem"}, "LOCOPILOT_TLS_CERT"),
        ({"LOCOPILOT_TLS_CERT": "missing.pem", "LOCOPILOT_TLS_KEY": "key.pem"}, "LOCOPILOT_TLS_CERT"),
    ],
)
def test_tls_settings_come_in_pairs_of_files(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    with pytest.raises(SettingsError, match=variable):
        load_settings({k: str(tmp_path / v) for k, v in env.items()})
