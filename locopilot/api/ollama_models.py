"""Ollama's model routes: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``,
``/api/delete``, ``/api/copy``, ``/api/pull``, and the root that Ollama clients probe.

Names are ``name:tag`` as in Ollama: an embedded model without a tag is listed as
``name:latest``, and either spelling finds it. What is shown of a model comes from its
GGUF header (:meth:`~locopilot.models.catalog.ModelCatalog.header`); a model an upstream
serves is listed by name, with the details locopilot does not know left empty.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, delete, get, post, route
from litestar.enums import MediaType
from litestar.response import Stream

from locopilot.api import console
from locopilot.api.generation import privacy_of, route_for
from locopilot.api.ollama import embedded_name
from locopilot.api.openai import all_cards
from locopilot.api.responses import BODY, GUARDED, ROUTED, answers
from locopilot.api.services import Library, Pipeline
from locopilot.engine.templates import choose_template
from locopilot.errors import InvalidRequest, LocopilotError, ModelNotFound, OllamaErrorBody
from locopilot.gateway.auth import note, principal_of
from locopilot.gateway.guard import EXCLUDE_FROM_AUTH
from locopilot.gateway.router import DEFAULT_TAG
from locopilot.models.catalog import ModelEntry, validate_model_name
from locopilot.models.gguf import GGUFHeader
from locopilot.models.pull import OllamaProgress, Puller, ollama_progress
from locopilot.providers.base import DescribesModels, human_count
from locopilot.providers.embedded import EmbeddedProvider
from locopilot.schemas.ollama import (
    CopyRequest,
    ModelDetails,
    ModelRequest,
    RunningList,
    RunningModel,
    ShowResponse,
    TagList,
    TagModel,
    Version,
    encoder,
)
from locopilot.schemas.openai import ModelCard

#: The Ollama release whose API this front follows; clients gate features on ``/api/version``.
OLLAMA_VERSION = "0.12.0"
ROOT_TEXT = "Ollama is running"
#: What ``/api/ps`` shows as the expiry of a model kept loaded until unloaded (as Ollama does, far ahead).
FOREVER = datetime(2318, 1, 1, tzinfo=UTC)

log = logging.getLogger(__name__)


def tag_name(name: str) -> str:
    """``name`` as Ollama lists it: with a tag, ``:latest`` when it has none."""
    return name if ":" in name else name + DEFAULT_TAG


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


def details_of(architecture: str | None, parameter_count: int | None, quantization: str | None) -> ModelDetails:
    family = architecture or ""
    return ModelDetails(
        family=family,
        families=[family] if family else None,
        parameter_size=human_count(parameter_count) or "",
        quantization_level=quantization or "",
    )


def digest_of(name: str, size: int, modified: int) -> str:
    """An identifier of a model file's version (name, size, time): not the file's SHA-256, which
    would mean reading gigabytes per listing; it changes when the file does."""
    return hashlib.sha256(f"{name}\0{size}\0{modified}".encode()).hexdigest()


def tag_of(card: ModelCard) -> TagModel:
    name = tag_name(card.id)
    size = card.size_bytes or 0
    return TagModel(
        name=name,
        model=name,
        modified_at=rfc3339(card.created),
        size=size,
        digest=digest_of(card.id, size, card.created),
        details=details_of(card.architecture, card.parameter_count, card.quantization),
    )


@get("/api/tags", responses=answers(TagList, 200, *GUARDED, 502, 503, front="ollama"))
async def tags(library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every model a client may name: the embedded ones, then each upstream's (as ``/v1/models``)."""
    cards = await all_cards(library, principal_of(request))
    listed = TagList(models=[tag_of(card) for card in cards if card.error is None])
    return Response(encoder.encode(listed), media_type=MediaType.JSON)


async def embedded_entry(library: Library, request: Request[Any, Any, Any], model: str) -> ModelEntry | None:
    """The embedded model ``model`` names, if the request's key may use it; None if there is none."""
    name = await embedded_name(library.router, model)
    if name is None or not library.router.admits(principal_of(request).constraints, EmbeddedProvider.name, name):
        return None
    entry = await anyio.to_thread.run_sync(library.catalog.get, name)
    return entry if entry.error is None else None


def model_info(header: GGUFHeader) -> dict[str, Any]:
    """The header's metadata as Ollama's ``model_info``: plain values, arrays left empty (as Ollama
    does unless asked to be verbose), the chat template out (it is ``template``)."""
    info: dict[str, Any] = {}
    for key, value in header.metadata.items():
        if key == "tokenizer.chat_template":
            continue
        info[key] = value if isinstance(value, str | int | float | bool) else []
    info["general.parameter_count"] = header.parameter_count
    return info


def capabilities(header: GGUFHeader) -> list[str]:
    """``embedding`` for an embedding model (it declares a pooling type), else ``completion`` and
    ``tools``: the engine calls tools with any model, in its template's own format or, where the
    template knows none, the grammar-constrained generic one (clients such as Copilot Chat offer
    a model for tool use only when ``tools`` is listed)."""
    arch = header.architecture or ""
    if f"{arch}.pooling_type" in header.metadata:
        return ["embedding"]
    return ["completion", "tools"]


@post("/api/show", status_code=200, responses=answers(ShowResponse, 200, *GUARDED, *BODY, *ROUTED, front="ollama"))
async def show(
    data: ModelRequest, pipeline: Pipeline, library: Library, request: Request[Any, Any, Any]
) -> Response[bytes]:
    model = data.model_name
    if not model:
        raise InvalidRequest("model is required", param="model")
    entry = await embedded_entry(library, request, model)
    if entry is None:
        return await upstream_show(pipeline, request, model)
    header = await anyio.to_thread.run_sync(library.catalog.header, entry.name)
    template = choose_template(header.metadata)
    stops = "\n".join(f'stop "{stop}"' for stop in template.stop) if template.stop else ""
    shown = ShowResponse(
        modelfile=f"# locopilot model {entry.name}\nFROM {entry.name}\n",
        parameters=stops,
        template=template.source,
        details=details_of(entry.architecture, entry.parameter_count, entry.quantization),
        model_info=model_info(header),
        capabilities=capabilities(header),
        modified_at=rfc3339(entry.modified),
    )
    return Response(encoder.encode(shown), media_type=MediaType.JSON)


async def upstream_show(pipeline: Pipeline, request: Request[Any, Any, Any], model: str) -> Response[bytes]:
    """``/api/show`` of a model an upstream serves, as far as that upstream can say (see
    :class:`~locopilot.providers.base.DescribesModels`): an Ollama upstream's own ``/api/show``,
    an OpenAI-compatible one's ``/v1/models`` entry. The upstream is asked under its name for the
    model (``llama3.2`` may be its ``llama3.2:latest``); the answer names the model as the client did."""
    policy = privacy_of(request, pipeline.settings.routing_privacy)
    plan = await route_for(pipeline, request, model, policy)
    route = plan.routes[0]
    if not isinstance(route.provider, DescribesModels):
        raise ModelNotFound(f'model "{model}" not found', param="model")
    try:
        described = await route.provider.describe(route.model)
    except ModelNotFound:
        raise ModelNotFound(f'model "{model}" not found', param="model") from None
    details = ModelDetails(
        parent_model=described.parent_model or "",
        format=described.format or "",
        family=described.family or "",
        families=list(described.families) or None,
        parameter_size=described.parameter_size or "",
        quantization_level=described.quantization_level or "",
    )
    shown = ShowResponse(
        modelfile=f"# {model} is served by the upstream {route.provider.name} as {route.model}\nFROM {model}\n",
        parameters=described.parameters or "",
        template=described.template or "",
        details=details,
        model_info=described.model_info,
        capabilities=list(described.capabilities),
        modified_at=described.modified_at or rfc3339(0),
    )
    body = {**described.extra, **msgspec.to_builtins(shown)}
    headers = {"X-Locopilot-Provider": route.provider.name}
    return Response(encoder.encode(body), media_type=MediaType.JSON, headers=headers)


@get("/api/ps", responses=answers(RunningList, 200, *GUARDED, front="ollama"))
async def ps(library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    """The embedded models loaded now; ``size`` is the model file's, ``size_vram`` 0 on a CPU."""
    principal = principal_of(request)
    running = []
    now = datetime.now(UTC)
    for info in library.manager.describe():
        if not info.alive or not library.router.admits(principal.constraints, EmbeddedProvider.name, info.model):
            continue
        entry = await anyio.to_thread.run_sync(library.catalog.get, info.model)
        ttl = library.manager.idle_ttl(info.model)
        expires = FOREVER if ttl < 0 else now + timedelta(seconds=max(0.0, ttl - info.idle_seconds))
        name = tag_name(info.model)
        running.append(
            RunningModel(
                name=name,
                model=name,
                size=entry.size_bytes,
                digest=digest_of(entry.name, entry.size_bytes, entry.modified),
                details=details_of(entry.architecture, entry.parameter_count, entry.quantization),
                expires_at=expires.isoformat().replace("+00:00", "Z"),
                size_vram=0,
                context_length=info.n_ctx,
            )
        )
    running.sort(key=lambda model: model.expires_at, reverse=True)
    return Response(encoder.encode(RunningList(models=running)), media_type=MediaType.JSON)


@get("/api/version", responses=answers(Version, 200, *GUARDED, front="ollama"))
async def version() -> Response[bytes]:
    return Response(encoder.encode(Version(version=OLLAMA_VERSION)), media_type=MediaType.JSON)


@delete("/api/delete", status_code=200, responses=answers(None, 200, *GUARDED, *BODY, 404, front="ollama"))
async def delete_model(data: ModelRequest, library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    """Delete an embedded model (unloading it first); an upstream's models are not ours to delete."""
    model = data.model_name
    if not model:
        raise InvalidRequest("model is required", param="model")
    entry = await embedded_entry(library, request, model)
    if entry is None:
        raise ModelNotFound(f"model '{model}' not found", param="model")
    await library.manager.unload(entry.name)
    await anyio.to_thread.run_sync(library.catalog.remove, entry.name)
    library.router.models_changed(EmbeddedProvider.name)
    return Response(b"", media_type=MediaType.JSON)


@post("/api/copy", status_code=200, responses=answers(None, 200, *GUARDED, *BODY, 404, front="ollama"))
async def copy_model(data: CopyRequest, library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    """``destination`` becomes another name of the embedded model ``source``: a link to the same file."""
    entry = await embedded_entry(library, request, data.source)
    if entry is None:
        raise ModelNotFound(f'model "{data.source}" not found', param="source")
    destination = validate_model_name(data.destination.removesuffix(DEFAULT_TAG))
    source = Path(entry.path)
    await anyio.to_thread.run_sync(lambda: library.catalog.add(source, name=destination, link=True))
    library.router.models_changed(EmbeddedProvider.name)
    return Response(b"", media_type=MediaType.JSON)


@post("/api/pull", status_code=200, responses=answers(OllamaProgress, 200, *GUARDED, *BODY, 404, front="ollama"))
async def pull(data: ModelRequest, puller: Puller, request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """Ollama's pull, by the one puller (locopilot.models.pull): NDJSON status lines as Ollama writes
    them (the default), or with ``stream`` false the last one alone. A bad name is a 400 before
    anything is sent; a failure once the lines have begun is an ``{"error": ...}`` line, as in Ollama."""
    lines = ollama_progress(puller, data.model_name, insecure=data.insecure)
    first = await anext(lines)
    note(request, "model_pull", model=data.model_name)
    if not data.stream:
        last = first
        try:
            async for line in lines:
                last = line
        finally:
            await lines.aclose()
        return Response(_progress_encoder.encode(last), media_type=MediaType.JSON)
    return Stream(_pull_lines(first, lines), media_type="application/x-ndjson")


async def _pull_lines(first: OllamaProgress, lines: AsyncGenerator[OllamaProgress, None]) -> AsyncIterator[bytes]:
    try:
        yield _progress_encoder.encode(first) + b"\n"
        async for line in lines:
            yield _progress_encoder.encode(line) + b"\n"
    except LocopilotError as exc:
        log.warning("pull failed: %s", exc.loggable())
        yield _progress_encoder.encode(OllamaErrorBody(exc.message)) + b"\n"
    finally:
        await lines.aclose()


_progress_encoder = msgspec.json.Encoder()


@route("/", http_method=["GET", "HEAD"], opt={EXCLUDE_FROM_AUTH: True}, include_in_schema=False)
async def root(request: Request[Any, Any, Any]) -> Response[str] | Response[bytes]:
    """Ollama's answer to its clients' liveness probe, with no key needed (as ``/health``); a browser
    (a GET asking for ``text/html``) gets the web console's page instead (:mod:`locopilot.api.console`)."""
    if console.wants_page(request):
        return console.page()
    return Response(ROOT_TEXT, media_type=MediaType.TEXT, headers={"Vary": "Accept"})


ROUTES = [tags, show, ps, version, delete_model, copy_model, pull, root]
