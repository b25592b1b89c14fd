"""``/v1/files`` (scope ``training``): fine-tuning datasets, uploaded as OpenAI's files API takes them.

``POST /v1/files`` is ``multipart/form-data`` with ``purpose`` (``fine-tune``, the only one
taken) and ``file``. The body is streamed to ``<data>/files/`` under a name the server chooses
(the client's file name is kept for display only), hashed on the way, capped at
``LOCOPILOT_MAX_FILE_BYTES`` (413), then checked whole with the dataset validator: a 400 names
each bad line, and nothing is kept. Only then is the file stored and listed.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import msgspec

# Litestar's own multipart parser (a dependency of Litestar); used directly to stream the
# upload to disk: Litestar's form parsing would spool it, and to its own size limit.
import multipart  # type: ignore[import-untyped]
from litestar import Request, Response, delete, get, post
from litestar.params import Parameter

from locopilot.api.responses import BODY, GUARDED, answers, json_response
from locopilot.errors import Conflict, InvalidRequest, LocopilotError, PayloadTooLarge
from locopilot.gateway.auth import Authenticator, principal_of
from locopilot.schemas.training import FileObject
from locopilot.settings import Settings
from locopilot.store import files as store
from locopilot.store import jobs
from locopilot.store.db import Database
from locopilot.store.files import StoredFile
from locopilot.training.traffic import TrafficFilter

PURPOSES = ("fine-tune",)
#: Room for the multipart framing and the purpose field beyond the file itself.
FRAMING_BYTES = 64 * 1024
MAX_FILENAME = 255
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


class FileList(msgspec.Struct):
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
    object: Literal["list"] = "list"


class FileDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["file"] = "file"


def file_object(stored: StoredFile) -> FileObject:
    return FileObject(
        id=stored.id,
        bytes=stored.bytes,
        created_at=int(stored.created_at),
        filename=stored.filename,
        purpose=stored.purpose,
        format=stored.format,
        examples=stored.examples,
        sha256=stored.sha256,
    )


def files_dir(settings: Settings) -> Path:
    return settings.data_path / "files"


class _Upload:
    """The parts of one multipart upload as they stream in: ``purpose`` and the file, to ``partial``."""

    def __init__(self, partial: Path, limit: int) -> None:
        self.partial = partial
        self.limit = limit
        self.purpose: str | None = None
        self.filename: str | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self._out: Any = None
        self._field: bytearray | None = None
        self._name: str | None = None

    def segment(self, segment: Any) -> None:
        self._name = segment.name
        if segment.name == "file":
            if self.filename is not None:
                raise InvalidRequest("Send one file per upload.", param="file")
            self.filename = _UNSAFE.sub("_", segment.filename or "upload.jsonl")[:MAX_FILENAME] or "upload.jsonl"
            self.partial.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Written on the event loop: each write is one network read's worth, into the page cache.
            self._out = self.partial.open("wb")
        else:
            self._field = bytearray()

    def data(self, chunk: bytes) -> None:
        if self._out is not None:
            self.size += len(chunk)
            if self.size > self.limit:
                raise PayloadTooLarge(
                    f"The file is larger than {self.limit} bytes (LOCOPILOT_MAX_FILE_BYTES).", param="file"
                )
            self.digest.update(chunk)
            self._out.write(chunk)
        elif self._field is not None:
            self._field += chunk
            if len(self._field) > 1024:
                raise InvalidRequest(f"The form field '{self._name}' is too long.", param=self._name)

    def end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._field is not None and self._name == "purpose":
            self.purpose = self._field.decode(errors="replace").strip()
        self._field = None

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def receive_upload(request: Request[Any, Any, Any], upload: _Upload, limit: int) -> None:
    """Stream the multipart body into ``upload``. Raises InvalidRequest or PayloadTooLarge."""
    content_type, options = request.content_type
    boundary = options.get("boundary")
    if content_type != "multipart/form-data" or not boundary:
        raise InvalidRequest("Upload the file as multipart/form-data with the fields 'purpose' and 'file'.")
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"The upload is larger than {limit} bytes (LOCOPILOT_MAX_FILE_BYTES).", param="file")
    received = 0
    try:
        with multipart.PushMultipartParser(boundary.encode(), max_segment_count=8) as parser:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"The upload is larger than {limit} bytes (LOCOPILOT_MAX_FILE_BYTES).")
                for event in parser.parse(chunk):
                    if event is None:
                        upload.end()
                    elif isinstance(event, multipart.MultipartSegment):
                        upload.segment(event)
                    else:
                        upload.data(event)
                if parser.closed:
                    break
    except multipart.MultipartError as exc:
        raise InvalidRequest(f"The multipart body could not be read: {exc}") from exc


def validated(path: Path) -> tuple[str, int]:
    """The dataset's format and example count; raises InvalidRequest naming the bad lines."""
    from locopilot.training.datasets import DatasetInvalid, validate

    try:
        summary = validate(path)
    except DatasetInvalid as exc:
        raise InvalidRequest(
            f"The file is not a valid fine-tuning dataset:\n{exc}", param="file", code="invalid_file"
        ) from exc
    return summary.format, summary.examples


@post(
    "/v1/files",
    status_code=200,
    # The cap is LOCOPILOT_MAX_FILE_BYTES, enforced while streaming (receive_upload).
    request_max_body_size=None,
    responses=answers(FileObject, 200, *GUARDED, *BODY),
)
async def upload_file(
    request: Request[Any, Any, Any], db: Database, settings: Settings, auth: Authenticator
) -> Response[bytes]:
    """Upload a fine-tuning dataset (multipart: ``purpose=fine-tune``, ``file``); it is validated whole."""
    file_id = f"file-{secrets.token_hex(12)}"
    folder = files_dir(settings)
    upload = _Upload(folder / f".{file_id}.partial", settings.max_file_bytes)
    try:
        await receive_upload(request, upload, settings.max_file_bytes + FRAMING_BYTES)
        upload.close()
        if upload.purpose not in PURPOSES:
            raise InvalidRequest(
                f"purpose must be one of {', '.join(PURPOSES)}, not {upload.purpose!r}", param="purpose"
            )
        if upload.filename is None:
            raise InvalidRequest("The upload has no 'file' part.", param="file")
        kind, examples = await anyio.to_thread.run_sync(validated, upload.partial)
        path = folder / f"{file_id}.jsonl"
        upload.partial.rename(path)
    except (LocopilotError, OSError):
        upload.close()
        upload.partial.unlink(missing_ok=True)
        raise
    stored = StoredFile(
        id=file_id,
        purpose=upload.purpose,
        filename=upload.filename,
        bytes=upload.size,
        sha256=upload.digest.hexdigest(),
        path=str(path),
        format=kind,
        examples=examples,
        key_id=principal_of(request).key_id,
        created_at=auth.clock(),
    )
    await db.call(store.insert, stored)
    return json_response(file_object(stored))


class TrafficDatasetObject(msgspec.Struct):
    """The answer of ``POST /v1/locopilot/datasets/from-logs``."""

    file: FileObject
    """The dataset, stored as an upload would be (``purpose`` ``fine-tune``)."""
    log_ids: list[int]
    """The request-log rows it holds, one example each, in its order."""
    skipped: dict[str, int]
    """Rows left out, by reason (see :mod:`locopilot.training.traffic`)."""


@post(
    "/v1/locopilot/datasets/from-logs",
    status_code=200,
    responses=answers(TrafficDatasetObject, 200, *GUARDED, *BODY, 409),
)
async def dataset_from_logs(
    data: TrafficFilter, db: Database, settings: Settings, auth: Authenticator, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """A fine-tuning dataset from the request log's prompts and replies (admin; needs LOCOPILOT_LOG_PROMPTS)."""
    from locopilot.store import logs
    from locopilot.training.traffic import examples

    if not settings.log_prompts:
        raise Conflict(
            "The request log holds no prompts: LOCOPILOT_LOG_PROMPTS is off, so there is nothing to build a "
            "dataset from. Turn it on, and the requests served from then on can be used.",
            code="log_prompts_off",
        )
    rows = await db.call(
        logs.with_text,
        limit=data.limit,
        model=data.model,
        provider=data.provider,
        key_id=data.key_id,
        status=data.status,
        since=data.since,
        until=data.until,
    )
    made = examples(rows)
    if not made.lines:
        left_out = ", ".join(f"{count} {reason}" for reason, count in made.skipped.items()) or "none"
        raise InvalidRequest(
            f"No logged request matches these filters with a chat reply to learn from "
            f"({len(rows)} rows matched; left out: {left_out}).",
            code="no_examples",
        )
    file_id = f"file-{secrets.token_hex(12)}"
    path = files_dir(settings) / f"{file_id}.jsonl"
    body = b"\n".join(made.lines) + b"\n"
    if len(body) > settings.max_file_bytes:
        raise PayloadTooLarge(
            f"The dataset would be {len(body)} bytes, over LOCOPILOT_MAX_FILE_BYTES "
            f"({settings.max_file_bytes}); ask for fewer rows (limit) or a narrower time range.",
        )
    await anyio.to_thread.run_sync(_write_new, path, body)
    try:
        kind, count = await anyio.to_thread.run_sync(validated, path)
    except LocopilotError:
        path.unlink(missing_ok=True)
        raise
    stored = StoredFile(
        id=file_id,
        purpose="fine-tune",
        filename=data.filename or f"traffic-{int(auth.clock())}.jsonl",
        bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        path=str(path),
        format=kind,
        examples=count,
        key_id=principal_of(request).key_id,
        created_at=auth.clock(),
    )
    await db.call(store.insert, stored)
    return json_response(TrafficDatasetObject(file_object(stored), made.log_ids, made.skipped))


def _write_new(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with path.open("xb") as file:
        file.write(body)


@get("/v1/files", responses=answers(FileList, 200, *GUARDED, 400))
async def list_files(
    db: Database,
    purpose: Annotated[str | None, Parameter(max_length=64)] = None,
    limit: Annotated[int, Parameter(ge=1, le=10000)] = 10000,
    after: Annotated[str | None, Parameter(max_length=128)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> Response[bytes]:
    """Uploaded files, newest first (``order=asc``: oldest first)."""
    found, more = await db.call(store.listed, after=after, limit=limit, purpose=purpose, newest_first=order == "desc")
    data = [file_object(f) for f in found]
    return json_response(FileList(data, more, data[0].id if data else None, data[-1].id if data else None))


@get("/v1/files/{file_id:str}", responses=answers(FileObject, 200, *GUARDED, 400, 404))
async def get_file(file_id: str, db: Database) -> Response[bytes]:
    """One uploaded file."""
    return json_response(file_object(await db.call(store.get, file_id)))


@delete("/v1/files/{file_id:str}", status_code=200, responses=answers(FileDeleted, 200, *GUARDED, 400, 404))
async def delete_file(file_id: str, db: Database) -> Response[bytes]:
    """Delete an uploaded file; refused while a job that has not finished trains on it."""
    stored = await db.call(store.get, file_id)
    user = await db.call(jobs.unfinished_job_using, file_id)
    if user is not None:
        raise InvalidRequest(
            f"File {file_id} is in use by the training job {user}, which has not finished.",
            param="file_id",
            code="file_in_use",
        )
    await db.call(store.delete, file_id)
    await anyio.to_thread.run_sync(lambda: Path(stored.path).unlink(missing_ok=True))
    return json_response(FileDeleted(file_id))


ROUTES = [upload_file, list_files, get_file, delete_file, dataset_from_logs]
