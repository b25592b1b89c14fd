"""Model management (scope ``models``): list, add, import, pull, show, verify, delete, load and unload the
embedded engine's models. ``locopilot models`` and ``locopilot pull`` are clients of these routes.

Add and import name paths on the server's machine (:mod:`locopilot.models.arrivals` does the work);
a path the server cannot see (a system service sees no home folders) is a 400 naming it.

``POST /v1/locopilot/models/pull`` streams the pull's progress as SSE (``event: progress``
with a :class:`~locopilot.models.pull.PullEvent`, then ``event: model`` with the model
card; ``event: error`` with an OpenAI error body if it fails after the stream began);
with ``"stream": false`` it answers the model card once done. The request is checked,
and the source asked for its listing, before the status is sent: a bad ref is a 400,
an unknown repository, file or tag a 404. A client that goes away cancels its pull
(the download stops unless another pull watches it, and resumes next time).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream
from msgspec import Meta

from locopilot.api.responses import BODY, GUARDED, answers
from locopilot.api.services import Library
from locopilot.engine.supervisor import ModelManager
from locopilot.errors import Conflict, LocopilotError, ModelNotFound
from locopilot.gateway.auth import note
from locopilot.gateway.streaming import sse
from locopilot.models import arrivals
from locopilot.models.arrivals import ImportReport, Verification
from locopilot.models.catalog import MAX_MODEL_NAME, ModelCatalog, validate_model_name
from locopilot.models.pull import Puller, PullEvent, prepare
from locopilot.schemas.openai import ModelCard, ModelList, encoder, model_card
from locopilot.store import models as records
from locopilot.store.db import Database
from locopilot.training.lineage import read as read_lineage

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class PullBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="hf.co/OWNER/REPO[:QUANT], hf.co/OWNER/REPO/FILE.gguf, an Ollama name, or a URL of a .gguf",
        ),
    ]
    name: Annotated[str, Meta(max_length=200, description="The local model name (default: from the ref).")] | None = (
        None
    )
    sha256: Annotated[str, Meta(description="A URL's pin: the file must hash to it.")] | None = None
    insecure: Annotated[bool, Meta(description="Allow a plain-http registry.")] = False
    insecure_no_checksum: Annotated[bool, Meta(description="Take a URL's file without a sha256 pin.")] = False
    stream: bool = True


MAX_PATH = 4096


class AddBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_PATH,
            description="The absolute path of a GGUF file on the server's machine (of a split model: its first part).",
        ),
    ]
    name: (
        Annotated[str, Meta(max_length=MAX_MODEL_NAME, description="The model name (default: the file's).")] | None
    ) = None
    link: Annotated[bool, Meta(description="Link to the file where it is instead of copying it.")] = False
    sha256: Annotated[str, Meta(description="The file's expected sha256: refused unless it matches.")] | None = None


class ImportBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    folder: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_PATH,
            description=(
                "The absolute path, on the server's machine, of an Ollama models folder, a Hugging Face hub cache, "
                "an LM Studio folder or any folder of GGUFs."
            ),
        ),
    ]
    copy: Annotated[bool, Meta(description="Copy the files (default: link to them where they are).")] = False


class LoadState(msgspec.Struct):
    id: str
    loaded: bool
    object: str = "model.load_state"


class Deleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "model"


PULL_STREAM = ResponseSpec(
    str,
    media_type="text/event-stream",
    generate_examples=False,
    description=(
        "SSE: `progress` events (status, digest, total, completed, bytes_per_second, eta_seconds), then `model`"
    ),
)


async def card_of(library: Library, name: str) -> ModelCard:
    """The model card of embedded model ``name``; raises InvalidModelName or ModelNotFound."""
    entry = await anyio.to_thread.run_sync(library.catalog.get, name)
    record = await library.db.call(records.get, name)
    lineage = await anyio.to_thread.run_sync(read_lineage, Path(entry.path))
    return model_card(entry, name in library.manager.loaded(), lineage, record)


@post(
    "/v1/locopilot/models/pull",
    status_code=200,
    responses={**answers(ModelCard, 200, *GUARDED, *BODY, 404, 409, 502, 507), 200: PULL_STREAM},
)
async def pull_model(
    data: PullBody, puller: Puller, library: Library, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    """Download a model into the models folder (see the module docstring)."""
    pull = prepare(
        data.model,
        name=data.name,
        sha256=data.sha256,
        insecure=data.insecure,
        no_checksum=data.insecure_no_checksum,
    )
    note(request, "model_pull", model=pull.name, ref=str(pull.ref))
    events = puller.pull(pull)
    # Primed past the source's listing: an unknown repository or tag is a real 404.
    primed = [await anext(events)]
    try:
        primed.append(await anext(events))
    except StopAsyncIteration:
        pass
    except BaseException:
        await events.aclose()
        raise
    if not data.stream:
        try:
            async for _ in events:
                pass
        finally:
            await events.aclose()
        return Response(encoder.encode(await card_of(library, pull.name)), media_type="application/json")
    return Stream(_stream(library, primed, events, pull.name), media_type="text/event-stream", headers=SSE_HEADERS)


async def _stream(
    library: Library, primed: list[PullEvent], events: AsyncGenerator[PullEvent, None], name: str
) -> AsyncIterator[bytes]:
    try:
        for event in primed:
            yield sse(event, "progress")
        async for event in events:
            yield sse(event, "progress")
        yield sse(await card_of(library, name), "model")
    except LocopilotError as exc:
        log.warning("pull of %s failed: %s", name, exc.loggable())
        yield sse(exc.body(), "error")
    finally:
        await events.aclose()


@get("/v1/locopilot/models", responses=answers(ModelList, 200, *GUARDED))
async def list_models(library: Library) -> Response[bytes]:
    """Every model of the models folder, with its header facts, source and sha256 (no upstream's)."""
    entries = await anyio.to_thread.run_sync(library.catalog.list)
    cards = [await card_of(library, entry.name) for entry in entries]
    return Response(encoder.encode(ModelList(cards)), media_type="application/json")


@post("/v1/locopilot/models", status_code=201, responses=answers(ModelCard, 201, *GUARDED, *BODY, 409))
async def add_model(data: AddBody, library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Add a GGUF file of the server's machine, copied or linked; a pin is checked before it appears."""
    path = arrivals.checked_path(data.path, "path")
    pin = arrivals.check_pin(data.sha256)
    if data.name is not None:
        validate_model_name(data.name)
    entry = await anyio.to_thread.run_sync(
        lambda: arrivals.add_file(library.catalog, library.db, path, name=data.name, link=data.link, pin=pin)
    )
    note(request, "model_added", model=entry.name, path=str(path))
    return Response(encoder.encode(await card_of(library, entry.name)), media_type="application/json", status_code=201)


@post("/v1/locopilot/models/import", status_code=200, responses=answers(ImportReport, 200, *GUARDED, *BODY))
async def import_models(
    data: ImportBody, catalog: ModelCatalog, db: Database, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """Add the models a folder of the server's machine holds, named as its layout names them (no network)."""
    folder = arrivals.checked_path(data.folder, "folder")
    found = await anyio.to_thread.run_sync(lambda: arrivals.import_folder(catalog, db, folder, copy=data.copy))
    added = [item.name for item in found if item.result != "skipped"]
    note(request, "models_imported", folder=str(folder), models=added)
    return Response(encoder.encode(ImportReport(found)), media_type="application/json")


@post(
    "/v1/locopilot/models/{model_id:str}/verify",
    status_code=200,
    responses=answers(Verification, 200, *GUARDED, 400, 404),
)
async def verify_model(model_id: str, catalog: ModelCatalog, db: Database) -> Response[bytes]:
    """Hash the model's file again and compare with the sha256 recorded when it arrived (see Verification)."""
    result = await anyio.to_thread.run_sync(arrivals.verify, catalog, db, model_id)
    return Response(encoder.encode(result), media_type="application/json")


@get("/v1/locopilot/models/{model_id:str}", responses=answers(ModelCard, 200, *GUARDED, 400, 404))
async def show_model(model_id: str, library: Library) -> Response[bytes]:
    """One model of the models folder: its header facts, where it came from, its sha256, whether loaded."""
    return Response(encoder.encode(await card_of(library, model_id)), media_type="application/json")


@delete(
    "/v1/locopilot/models/{model_id:str}", status_code=200, responses=answers(Deleted, 200, *GUARDED, 400, 404, 409)
)
async def delete_model(model_id: str, library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Delete a model (a link: the link alone); unloads it first. 409 while a training job uses it."""
    await anyio.to_thread.run_sync(library.catalog.get, model_id)
    job = await library.db.call(records.training_job_using, model_id)
    if job is not None:
        raise Conflict(
            f"The model '{model_id}' is the base of training job {job}; cancel it first", code="model_in_use"
        )
    await library.manager.unload(model_id)
    await anyio.to_thread.run_sync(_remove, library, model_id)
    note(request, "model_deleted", model=model_id)
    return Response(encoder.encode(Deleted(model_id)), media_type="application/json")


def _remove(library: Library, name: str) -> None:
    library.catalog.remove(name)
    records.delete(library.db, name)


async def usable(catalog: ModelCatalog, name: str) -> None:
    """Raise InvalidModelName, or ModelNotFound for a model that is absent or not a GGUF llama.cpp may open."""
    entry = await anyio.to_thread.run_sync(catalog.get, name)
    if entry.error is not None:
        raise ModelNotFound(f"The model '{name}' is not a usable GGUF file: {entry.error}", param="model")


@post(
    "/v1/locopilot/models/{model_id:str}/load",
    status_code=200,
    responses=answers(LoadState, 200, *GUARDED, 400, 404, 503),
)
async def load_model(model_id: str, catalog: ModelCatalog, manager: ModelManager) -> Response[bytes]:
    """Load a model into a runner now (it counts towards LOCOPILOT_MAX_LOADED_MODELS); for a LoRA adapter, its base."""
    await usable(catalog, model_id)
    entry = await anyio.to_thread.run_sync(catalog.get, model_id)
    await manager.runner(entry.adapter_of or model_id)
    return Response(encoder.encode(LoadState(model_id, True)), media_type="application/json")


@post(
    "/v1/locopilot/models/{model_id:str}/unload", status_code=200, responses=answers(LoadState, 200, *GUARDED, 400, 404)
)
async def unload_model(model_id: str, catalog: ModelCatalog, manager: ModelManager) -> Response[bytes]:
    """Unload a model: its runner ends and gives its memory back. Requests in flight on it fail."""
    await anyio.to_thread.run_sync(catalog.get, model_id)
    await manager.unload(model_id)
    return Response(encoder.encode(LoadState(model_id, False)), media_type="application/json")


ROUTES = [
    list_models,
    add_model,
    import_models,
    pull_model,
    show_model,
    verify_model,
    delete_model,
    load_model,
    unload_model,
]
