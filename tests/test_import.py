"""``locopilot models import``: models already on the machine, without a network, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import Server
from tests.fakes.hubs import gguf_bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
        "LOCOPILOT_DATA_DIR": str(root / "data"),
        "LOCOPILOT_MODELS_DIR": str(root / "models"),
        "LOCOPILOT_PORT": "1",  # no server answers: the CLI works on the folder
        "XDG_CONFIG_HOME": str(root / "config"),
        "COLUMNS": "300",
    }
    return subprocess.run([sys.executable, "-m", "locopilot", *args], env=env, capture_output=True, text=True)


def ollama_folder(root: Path, model: bytes) -> Path:
    """``~/.ollama/models`` as Ollama writes it: manifests by host/namespace/model/tag, blobs by digest."""
    folder = root / "ollama-models"
    template = b"{{ .Prompt }}"
    layers = []
    for media_type, data in (
        ("application/vnd.ollama.image.model", model),
        ("application/vnd.ollama.image.template", template),
    ):
        (folder / "blobs").mkdir(parents=True, exist_ok=True)
        (folder / "blobs" / f"sha256-{sha(data)}").write_bytes(data)
        layers.append({"mediaType": media_type, "digest": f"sha256:{sha(data)}", "size": len(data)})
    manifest = folder / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return folder


def hf_cache(root: Path, model: bytes, projector: bytes) -> Path:
    """``~/.cache/huggingface/hub`` as huggingface_hub writes it: snapshot files link to blobs named by sha256."""
    repo = root / "hub" / "models--acme--Tiny-GGUF"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in (("tiny.Q4_K_M.gguf", model), ("mmproj-tiny.gguf", projector)):
        (repo / "blobs" / sha(data)).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / sha(data))
    return root / "hub"


def test_import_ollama_folder_and_hf_cache(tmp_path: Path) -> None:
    first = gguf_bytes(tmp_path, seed=1)
    second = gguf_bytes(tmp_path, seed=2)
    done = cli(tmp_path, "models", "import", str(ollama_folder(tmp_path, first)))
    assert done.returncode == 0, done.stderr
    assert "tiny:1b" in done.stdout and "linked" in done.stdout
    done = cli(tmp_path, "models", "import", str(hf_cache(tmp_path, second, b"GGUF-projector")), "--copy")
    assert done.returncode == 0, done.stderr
    models = tmp_path / "models"
    assert (models / "tiny:1b.gguf").is_symlink() and (models / "tiny:1b.gguf").read_bytes() == first
    copied = models / "tiny.Q4_K_M.gguf"
    assert not copied.is_symlink() and copied.read_bytes() == second
    assert sorted(cli(tmp_path, "models", "list", "--names").stdout.split()) == ["tiny.Q4_K_M", "tiny:1b"]
    # Importing again skips what is there; the recorded sha256s check out.
    again = cli(tmp_path, "models", "import", str(tmp_path / "ollama-models"))
    assert "skipped" in again.stdout
    verified = cli(tmp_path, "models", "verify")
    assert verified.returncode == 0 and verified.stdout.count(" ok ") == 2, verified.stdout


def test_imported_sources_show_on_the_server(tmp_path: Path) -> None:
    model = gguf_bytes(tmp_path, seed=3)
    assert cli(tmp_path, "models", "import", str(ollama_folder(tmp_path, model))).returncode == 0
    server = Server(tmp_path, {}).start(path="/health")
    try:
        card = httpx.get(f"{server.url}/v1/models/tiny:1b", timeout=10).json()
    finally:
        server.stop()
    assert card["source"] == "registry.ollama.ai/library/tiny:1b" and card["sha256"] == sha(model)
