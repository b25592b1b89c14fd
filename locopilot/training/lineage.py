"""Where a fine-tuned model came from: a manifest beside its GGUF in the models folder.

``NAME.gguf.lineage.json`` holds the model file's sha256, the base model's name and sha256
(and the base's own lineage, when it was fine-tuned here too), the dataset's sha256, the
job id and the hyperparameters. It travels with the model when both are copied; the
catalog ignores it (it does not end in ``.gguf``) and removes it with the model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import msgspec

SUFFIX = ".lineage.json"
_CHUNK = 1 << 20


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    """A fine-tuned model's origin. ``base_lineage`` is the base's own Lineage, as stored, or None."""

    sha256: str
    job_id: str
    framework: str
    base_model: str
    base_sha256: str
    dataset_sha256: str
    training_file: str | None = None
    hyperparameters: dict[str, Any] = msgspec.field(default_factory=dict)
    hf_base: str | None = None
    """An external framework's job: the base in Hugging Face form that it trained."""
    created_at: float
    base_lineage: dict[str, Any] | None = None


def manifest_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read(model_path: Path) -> Lineage | None:
    """The lineage stored beside ``model_path``, or None (none, or unreadable)."""
    try:
        return msgspec.json.decode(manifest_path(model_path).read_bytes(), type=Lineage)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def write(model_path: Path, lineage: Lineage) -> None:
    """Write the manifest for ``model_path`` (to a hidden file first, renamed into place)."""
    target = manifest_path(model_path)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(msgspec.json.format(msgspec.json.encode(lineage)))
    os.replace(partial, target)
