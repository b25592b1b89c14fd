"""Models already on the machine: an Ollama models folder, a Hugging Face hub cache, a folder of GGUFs.

:func:`found_in` lists what a folder holds, with the names, sources and SHA-256s its
layout tells (nothing is hashed here):

- Ollama (``~/.ollama/models``): ``manifests/HOST/NAMESPACE/MODEL/TAG`` name the model
  layer's digest; the GGUF is ``blobs/sha256-HEX``. Name ``MODEL:TAG``; the template and
  params layers are kept as metadata.
- Hugging Face hub cache (``~/.cache/huggingface/hub``): ``models--OWNER--REPO/snapshots/
  COMMIT/FILE.gguf``, links to ``blobs/SHA256`` for LFS files. Name from the file.
- Anything else, LM Studio's folder (``~/.lmstudio/models/PUBLISHER/REPO/FILE.gguf``)
  included: every ``.gguf`` below it, names from the files. A split model is imported
  by its first part (the others must stay beside it: by reference only).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from locopilot.errors import InvalidRequest
from locopilot.models.refs import SPLIT_RE, file_stem, safe_name
from locopilot.models.sources import OLLAMA_METADATA_LAYERS, OLLAMA_MODEL_LAYER

MAX_MANIFEST = 1024 * 1024
MAX_ENTRIES = 100_000
MAX_METADATA = 1024 * 1024
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Found:
    name: str
    path: Path
    source: str
    sha256: str | None = None
    split: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


def kind_of(folder: Path) -> str:
    if (folder / "manifests").is_dir() and (folder / "blobs").is_dir():
        return "ollama"
    if folder.name.startswith("models--") or any(folder.glob("models--*")):
        return "huggingface"
    return "folder"


def found_in(folder: Path) -> list[Found]:
    """What ``folder`` holds, by :func:`kind_of`; unreadable entries are skipped."""
    match kind_of(folder):
        case "ollama":
            return _ollama(folder)
        case "huggingface":
            return _huggingface(folder)
        case _:
            return _folder(folder)


def _ollama(folder: Path) -> list[Found]:
    found = []
    for manifest in sorted((folder / "manifests").glob("*/*/*/*")):
        if not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST:
            continue
        host, namespace, model, tag = manifest.relative_to(folder / "manifests").parts
        try:
            layers = json.loads(manifest.read_bytes())["layers"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        digests = {layer.get("mediaType"): str(layer.get("digest", "")) for layer in layers if isinstance(layer, dict)}
        digest = digests.get(OLLAMA_MODEL_LAYER, "")
        hexdigest = digest.removeprefix("sha256:")
        blob = folder / "blobs" / f"sha256-{hexdigest}"
        if not _HEX.fullmatch(hexdigest) or not blob.is_file():
            continue
        metadata = {}
        for media_type, kept in OLLAMA_METADATA_LAYERS.items():
            layer_hex = digests.get(media_type, "").removeprefix("sha256:")
            path = folder / "blobs" / f"sha256-{layer_hex}"
            if _HEX.fullmatch(layer_hex) and path.is_file() and path.stat().st_size <= MAX_METADATA:
                metadata[kept] = path.read_text(errors="replace")
        found.append(
            Found(safe_name(f"{model}:{tag}"), blob, f"{host}/{namespace}/{model}:{tag}", hexdigest, metadata=metadata)
        )
    return found


def _huggingface(folder: Path) -> list[Found]:
    repos = [folder] if folder.name.startswith("models--") else sorted(folder.glob("models--*"))
    found = []
    for repo in repos:
        repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
        ref = repo / "refs" / "main"
        commit = ref.read_text().strip() if ref.is_file() else None
        snapshots = [repo / "snapshots" / commit] if commit else sorted((repo / "snapshots").glob("*"))
        for snapshot in snapshots:
            for path in sorted(snapshot.rglob("*.gguf")):
                relative = path.relative_to(snapshot).as_posix()
                if not _wanted(relative):
                    continue
                blob = path.resolve().name
                found.append(
                    Found(
                        file_stem(relative),
                        path,
                        f"hf.co/{repo_id}/{relative}",
                        blob if _HEX.fullmatch(blob) else None,
                        split=SPLIT_RE.search(relative) is not None,
                    )
                )
            if found and commit is None:
                break
    return found


def _folder(folder: Path) -> list[Found]:
    return [
        Found(file_stem(path.name), path, f"file:{path}", split=SPLIT_RE.search(path.name) is not None)
        for path in _ggufs(folder)
        if path.is_file() and _wanted(path.name)
    ]


def _ggufs(folder: Path) -> list[Path]:
    """The ``.gguf`` files below ``folder``, sorted, hidden folders and links to folders not entered.

    Raises InvalidRequest past :data:`MAX_ENTRIES` entries: an import of ``/`` would walk the whole machine.
    """
    found = []
    seen = 0
    for top, folders, files in os.walk(folder):
        seen += len(folders) + len(files)
        if seen > MAX_ENTRIES:
            raise InvalidRequest(
                f"{folder} holds more than {MAX_ENTRIES:,} files and folders: name the folder the models are in",
                param="folder",
            )
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(top) / name for name in files if name.lower().endswith(".gguf") and not name.startswith(".")]
    return sorted(found)


def _wanted(name: str) -> bool:
    """Model files only: not a vision projector, and of a split model its first part alone."""
    if "mmproj" in name.lower():
        return False
    match = SPLIT_RE.search(name)
    return match is None or int(match.group(1)) == 1
