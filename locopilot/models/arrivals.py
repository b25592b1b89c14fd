"""Models that arrive from files on this machine: add one file, import a folder, verify what arrived.

The work behind ``POST /v1/locopilot/models`` (add), ``POST /v1/locopilot/models/import``
and ``POST /v1/locopilot/models/{id}/verify``, and behind ``locopilot models add``,
``import`` and ``verify`` when no server answers (see :mod:`locopilot.cli.remote`). Paths
are the paths of the machine that runs this code. Every function blocks (it hashes and
copies files): from async code, call it in a worker thread.

Raises :class:`~locopilot.errors.InvalidRequest` (``param`` names the field) for a path
that is missing or not a GGUF, or a pin that does not match; :class:`~locopilot.errors.Conflict`
for a name that is taken; InvalidModelName and ModelNotFound as the catalog does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import msgspec

from locopilot.errors import Conflict, InvalidRequest, LocopilotError
from locopilot.models import imports
from locopilot.models.catalog import SUFFIX, ModelCatalog, ModelEntry, split_parts, validate_model_name
from locopilot.models.download import sha256_file
from locopilot.models.sources import SHA256_RE
from locopilot.store import models as records
from locopilot.store.db import Database
from locopilot.store.models import FilePart, ModelRecord

#: The error code of a path that the machine doing the work cannot see.
NOT_FOUND = "path_not_found"


class Imported(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One model an import found: ``linked`` or ``copied`` into the models folder, or ``skipped`` (``reason``)."""

    name: str
    source: str
    result: Literal["linked", "copied", "skipped"]
    reason: str | None = None


class ImportReport(msgspec.Struct):
    data: list[Imported]
    object: str = "list"


class Verification(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A model hashed again. ``state``: ``ok`` (the recorded sha256), ``changed`` (another one; ``recorded``
    holds the old), ``recorded`` (none was recorded: this one is, now) or ``missing`` (unreadable; ``error``)."""

    id: str
    state: Literal["ok", "changed", "recorded", "missing"]
    sha256: str | None = None
    recorded: str | None = None
    error: str | None = None
    object: str = "model.verification"


def check_pin(pin: str | None) -> str | None:
    """``pin`` in lower case, or None; raises InvalidRequest (``param`` sha256) unless 64 hex digits."""
    if pin is None:
        return None
    pin = pin.strip().lower()
    if not SHA256_RE.fullmatch(pin):
        raise InvalidRequest("sha256 must be 64 hexadecimal digits", param="sha256")
    return pin


def checked_path(text: str, param: str) -> Path:
    """``text`` as an absolute path; raises InvalidRequest naming ``param`` otherwise. Whether it exists is
    for the caller to find out."""
    if "\x00" in text or not text.startswith("/"):
        raise InvalidRequest(f"{param} must be an absolute path on the server's machine", param=param)
    return Path(text)


def default_name(path: Path) -> str:
    """A file's model name: its base name without ``.gguf``."""
    return path.name[: -len(SUFFIX)] if path.name.lower().endswith(SUFFIX) else path.name


def add_file(
    catalog: ModelCatalog, db: Database, path: Path, *, name: str | None, link: bool, pin: str | None
) -> ModelEntry:
    """Add the GGUF at ``path`` (a split model's first part brings the others) as model ``name``, copied or
    linked, and record where it came from. ``pin`` (from :func:`check_pin`) must be the sha256 of the file
    (of a split's first part), or nothing is added."""
    name = validate_model_name(name or default_name(path))
    if not path.is_file():
        raise InvalidRequest(f"The file {path} does not exist or is not a regular file", param="path", code=NOT_FOUND)
    if _taken(catalog, name):
        raise Conflict(f"The model '{name}' already exists", param="name", code="model_exists")
    digest = None
    if pin is not None or not link:
        digest = sha256_file(path)
        if pin is not None and digest != pin:
            raise InvalidRequest(f"{path} has sha256 {digest}, not {pin}; nothing was added", param="sha256")
    parts = split_parts(path)
    entry = _add(catalog, path, name, link=link)
    records.put(
        db,
        ModelRecord(
            name=entry.name,
            source=f"file:{path.resolve()}",
            sha256=digest,
            size=sum(part.stat().st_size for part in parts),
            files=_files(parts),
            pinned=pin is not None,
            arrived_at=time.time(),
        ),
    )
    return entry


def import_folder(catalog: ModelCatalog, db: Database, folder: Path, *, copy: bool) -> list[Imported]:
    """Add every model :func:`locopilot.models.imports.found_in` ``folder`` holds, linked or copied (split
    models too); a name that exists is skipped. Raises InvalidRequest (``param`` folder) if there is none."""
    if not folder.is_dir():
        raise InvalidRequest(f"The folder {folder} does not exist or is not a folder", param="folder", code=NOT_FOUND)
    found = imports.found_in(folder)
    if not found:
        raise InvalidRequest(f"no GGUF models found in {folder} (read as {imports.kind_of(folder)})", param="folder")
    results = []
    for item in found:
        try:
            if _taken(catalog, item.name):
                raise Conflict(f"The model '{item.name}' already exists")
            parts = split_parts(item.path)
            entry = _add(catalog, item.path, item.name, link=not copy)
        except LocopilotError as exc:
            results.append(Imported(name=item.name, source=item.source, result="skipped", reason=exc.message))
            continue
        record = ModelRecord(
            name=entry.name,
            source=item.source,
            sha256=item.sha256,
            size=sum(part.stat().st_size for part in parts),
            files=_files(parts),
            metadata=item.metadata,
            arrived_at=time.time(),
        )
        records.put(db, record)
        results.append(Imported(name=entry.name, source=item.source, result="copied" if copy else "linked"))
    return results


def verify(catalog: ModelCatalog, db: Database, name: str) -> Verification:
    """Hash model ``name`` again and compare with its record; a model without a recorded sha256 gets one."""
    entry = catalog.get(name)
    record = records.get(db, name)
    try:
        digest = sha256_file(catalog.load_path(name))
    except (OSError, LocopilotError) as exc:
        return Verification(id=name, state="missing", error=str(exc))
    if record is not None and record.sha256 is not None:
        if record.sha256 == digest:
            return Verification(id=name, state="ok", sha256=digest)
        return Verification(id=name, state="changed", sha256=digest, recorded=record.sha256)
    if record is None:
        record = ModelRecord(name=name, source="unknown", sha256=None, size=entry.size_bytes, arrived_at=time.time())
    records.put(db, msgspec.structs.replace(record, sha256=digest))
    return Verification(id=name, state="recorded", sha256=digest)


def _taken(catalog: ModelCatalog, name: str) -> bool:
    path = catalog.path_for(name)
    return path.is_symlink() or path.exists()


def _add(catalog: ModelCatalog, path: Path, name: str, *, link: bool) -> ModelEntry:
    try:
        return catalog.add(path, name=name, link=link)
    except InvalidRequest as exc:
        if _taken(catalog, name):  # added meanwhile
            raise Conflict(exc.message, param="name", code="model_exists") from exc
        raise InvalidRequest(exc.message, param="path") from exc


def _files(parts: list[Path]) -> list[FilePart]:
    """A split model's parts, as a record lists them (hashes are not known: only the first part's is)."""
    if len(parts) == 1:
        return []
    return [FilePart(part.name, None, part.stat().st_size) for part in parts]
