"""``locopilot models`` on a machine where locopilot runs as a service: the real CLI finds the real server
through the service's env file and works on the server's models folder, never on its own.

Also: split GGUFs (made from the default model by gguf-py's writer) imported by link and by
copy, loaded by llama.cpp and answering a chat; and the local folder when no server answers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from locopilot.models.gguf import read_header
from locopilot.models.memory import model_header
from tests.conftest import Server, free_port
from tests.fakes.hubs import split_gguf

ADMIN = "models-cli-admin-key-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
QUESTION = "Which city is the capital of France?"


def service_env(root: Path, **values: str) -> Path:
    """``~/.config/locopilot/locopilot.env`` as ``service install --user`` leaves it (under ``root``)."""
    config = root / "config"
    env_file = config / "locopilot" / "locopilot.env"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text("# locopilot settings\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    env_file.chmod(0o600)
    return config


def cli_env(root: Path, config: Path, **extra: str) -> dict[str, str]:
    """A shell of the operator's: no LOCOPILOT_* address or key, and a models folder of its own that the
    service does not use (the CLI must leave it alone while a server answers)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
        "XDG_CONFIG_HOME": str(config),
        "LOCOPILOT_DATA_DIR": str(root / "cli-data"),
        "LOCOPILOT_MODELS_DIR": str(root / "cli-models"),
        "COLUMNS": "300",
        **extra,
    }


def cli(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "locopilot", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    assert ADMIN not in done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("service"), {"smol": smollm2_path}, {"LOCOPILOT_ADMIN_KEY": ADMIN})
    running.start(path="/health")
    yield running
    running.stop()
    assert ADMIN not in running.log_path.read_text(errors="replace")


@pytest.fixture
def env(tmp_path: Path, server: Server) -> dict[str, str]:
    return cli_env(tmp_path, service_env(tmp_path, LOCOPILOT_PORT=str(server.port), LOCOPILOT_ADMIN_KEY=ADMIN))


def card(server: Server, name: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/locopilot/models/{name}", headers=HEADERS, timeout=30)


def test_every_command_works_on_the_service_folder(
    server: Server, env: dict[str, str], tmp_path: Path, smollm2_path: Path
) -> None:
    listed = cli(env, "models", "list", "--names")
    assert "smol" in listed.stdout.split() and listed.stderr == ""
    digest = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    added = cli(env, "models", "add", str(smollm2_path), "--link", "--name", "linked", "--sha256", digest)
    assert "added linked" in added.stdout
    assert (server.models_dir / "linked.gguf").is_symlink()
    assert card(server, "linked").json()["sha256"] == digest
    shown = cli(env, "models", "show", "linked").stdout
    assert f"file:{smollm2_path.resolve()}" in shown and "Q4_1" in shown

    assert "loaded linked" in cli(env, "models", "load", "linked").stdout
    assert card(server, "linked").json()["loaded"] is True
    assert "unloaded linked" in cli(env, "models", "unload", "linked").stdout
    assert card(server, "linked").json()["loaded"] is False

    verified = cli(env, "models", "verify", "linked")
    assert "ok" in verified.stdout and digest in verified.stdout
    refused = cli(env, "models", "add", str(smollm2_path), "--name", "pinned", "--sha256", "0" * 64, code=1)
    assert "nothing was added" in refused.stderr and "HTTP 400" in refused.stderr
    assert "HTTP 409" in cli(env, "models", "add", str(smollm2_path), "--link", "--name", "linked", code=1).stderr

    assert "removed linked" in cli(env, "models", "rm", "linked").stdout
    assert card(server, "linked").status_code == 404
    assert "does not exist" in cli(env, "models", "show", "linked", code=1).stderr
    assert "Invalid model name '../smol'" in cli(env, "models", "rm", "../smol", code=1).stderr
    assert (server.models_dir / "smol.gguf").is_symlink()
    # The operator's own folder was never touched.
    assert not (tmp_path / "cli-models").exists() and not (tmp_path / "cli-data").exists()


def test_the_environment_wins_over_the_env_file_and_keys_stay_secret(
    server: Server, env: dict[str, str], tmp_path: Path
) -> None:
    refused = cli({**env, "LOCOPILOT_ADMIN_KEY": "a-wrong-key-but-long-enough-0123"}, "models", "list", code=1)
    assert "HTTP 401" in refused.stderr and "--key-file" in refused.stderr
    assert "a-wrong-key" not in refused.stderr + refused.stdout
    key_file = tmp_path / "key"
    key_file.write_text(ADMIN + "\n")
    bare = cli_env(tmp_path, tmp_path / "no-config", LOCOPILOT_PORT=str(server.port))
    assert "smol" in cli(bare, "models", "list", "--names", "--key-file", str(key_file)).stdout.split()
    assert "HTTP 401" in cli(bare, "models", "list", code=1).stderr
    url = cli(bare, "models", "list", "--names", "--url", server.url, "--key-file", str(key_file))
    assert "smol" in url.stdout.split()


def test_no_server_means_the_local_folder_said_in_one_line(tmp_path: Path, smollm2_path: Path) -> None:
    port = free_port()
    env = cli_env(tmp_path, service_env(tmp_path, LOCOPILOT_PORT=str(port), LOCOPILOT_ADMIN_KEY=ADMIN))
    added = cli(env, "models", "add", str(smollm2_path), "--link", "--name", "here")
    note = f"no locopilot server answers at http://127.0.0.1:{port}; working on the local folder {tmp_path}"
    assert added.stderr.splitlines() == [note + "/cli-models"]
    assert (tmp_path / "cli-models" / "here.gguf").is_symlink()
    assert cli(env, "models", "list", "--names").stdout.split() == ["here"]
    assert cli(env, "models", "list", "--names", "--local").stderr == ""
    assert "needs a running server" in cli(env, "models", "load", "here", code=1).stderr
    assert "does not exist" in cli(env, "models", "rm", "nope", code=1).stderr


@pytest.fixture(scope="module")
def split_parts(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> list[Path]:
    parts = split_gguf(smollm2_path, tmp_path_factory.mktemp("split"), "smol-split", max_tensors=100)
    assert [p.name for p in parts] == [f"smol-split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return parts


def hf_cache(root: Path, parts: list[Path]) -> Path:
    """A Hugging Face hub cache holding the split model: snapshot names link to blobs named by sha256."""
    repo = root / "hub" / "models--acme--SmolSplit-GGUF"
    commit = "c" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit / "Q4_1"
    snapshot.mkdir(parents=True)
    for part in parts:
        blob = repo / "blobs" / hashlib.sha256(part.read_bytes()).hexdigest()
        os.link(part, blob)
        name = part.name.replace("smol-split", "hf-split")
        (snapshot / name).symlink_to(Path("..") / ".." / ".." / "blobs" / blob.name)
    return root / "hub"


def ask(server: Server, model: str) -> str:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, max_retries=0, timeout=180) as client:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0
        )
    return reply.choices[0].message.content or ""


def test_split_models_imported_by_copy_and_by_link_serve_a_chat(
    server: Server, env: dict[str, str], tmp_path: Path, split_parts: list[Path]
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for part in split_parts:
        os.link(part, folder / part.name)
    copied = cli(env, "models", "import", str(folder), "--copy")
    assert "smol-split" in copied.stdout and "copied" in copied.stdout
    parts = server.models_dir / ".splits" / "smol-split"
    assert sorted(p.name for p in parts.iterdir()) == [p.name for p in split_parts]
    assert not any(p.is_symlink() for p in parts.iterdir())
    assert (parts / split_parts[1].name).stat().st_ino != split_parts[1].stat().st_ino  # copies, not the files
    assert card(server, "smol-split").json()["source"] == f"file:{folder / split_parts[0].name}"

    linked = cli(env, "models", "import", str(hf_cache(tmp_path, split_parts)))
    assert "hf-split" in linked.stdout and "linked" in linked.stdout
    assert all(p.is_symlink() for p in (server.models_dir / ".splits" / "hf-split").iterdir())

    assert "Paris" in ask(server, "smol-split")
    assert "Paris" in ask(server, "hf-split")
    assert cli(env, "models", "verify", "hf-split").stdout.count(" ok ") == 1

    for name in ("smol-split", "hf-split"):
        cli(env, "models", "rm", name)
        assert not (server.models_dir / ".splits" / name).exists()
    assert all(part.is_file() for part in split_parts)  # the sources stay


def test_a_split_added_by_its_first_part_brings_the_others(
    server: Server, env: dict[str, str], tmp_path: Path, split_parts: list[Path]
) -> None:
    folder = tmp_path / "incomplete"
    folder.mkdir()
    for part in split_parts[:2]:
        os.link(part, folder / part.name)
    missing = cli(env, "models", "add", str(folder / split_parts[0].name), "--link", code=1)
    assert "part 3" in missing.stderr and "is missing" in missing.stderr
    shutil.copy(split_parts[2], folder / split_parts[2].name)
    cli(env, "models", "add", str(folder / split_parts[0].name), "--link", "--name", "added-split")
    assert len(list((server.models_dir / ".splits" / "added-split").iterdir())) == 3
    cli(env, "models", "rm", "added-split")


def test_the_memory_check_counts_every_part_of_a_split(split_parts: list[Path], smollm2_path: Path) -> None:
    whole = read_header(smollm2_path)
    first = read_header(split_parts[0])
    assert 0 < first.tensor_bytes < whole.tensor_bytes  # the first part's own tensors alone
    assert model_header(split_parts[0]).tensor_bytes == whole.tensor_bytes
    assert model_header(smollm2_path) == whole
