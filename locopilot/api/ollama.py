"""Ollama's generation routes (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``).

A translator, not a second pipeline: each body becomes one GenerationRequest run by
:func:`~locopilot.api.generation.serve_generation` (embeddings: :func:`serve_embedding`),
and :class:`OllamaFormatter` writes the events as Ollama does: NDJSON by default, one
object with ``"stream": false``. The last object's statistics are measured here, as the
gateway sees the request: ``total_duration`` from the handler's start to the last byte,
``load_duration`` the provider's (the embedded engine's runner start, an Ollama upstream's
own), ``prompt_eval_duration`` the rest of the time to the first token, ``eval_duration``
from the first token to the last.

``keep_alive`` sets how long an embedded model stays loaded after the request
(:meth:`~locopilot.engine.supervisor.ModelManager.keep`), and goes on to an Ollama upstream
with the request; a request with nothing to generate from loads the model, or with
``keep_alive`` 0 unloads it, as in Ollama (an Ollama upstream is asked to do the same).

``logprobs`` come from the TextDelta events (the engine's, an upstream's) and go out as
Ollama writes them, on each chunk and all together in a whole reply; ``thinking`` the same
way, from a provider that passed ``think`` on (see GenerationRequest.think).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, post
from litestar.response import Stream

from locopilot.api.generation import privacy_of, route_for, serve_embedding, serve_generation
from locopilot.api.ollama_requests import chat_generation, generate_generation, keep_alive_seconds
from locopilot.api.openai import check_text_size
from locopilot.api.responses import BODY, GUARDED, ROUTED, answers
from locopilot.api.services import Library, Pipeline
from locopilot.engine.supervisor import ModelManager
from locopilot.errors import InvalidRequest, LocopilotError, OllamaErrorBody
from locopilot.gateway.router import Router, served_name
from locopilot.gateway.streaming import Reply
from locopilot.models.catalog import ModelCatalog
from locopilot.providers.base import (
    Finish,
    GenerationRequest,
    KeepsModelsLoaded,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
)
from locopilot.providers.embedded import EmbeddedProvider
from locopilot.schemas.ollama import (
    CallOut,
    ChatChunk,
    ChatRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    FunctionCall,
    GenerateChunk,
    GenerateRequest,
    LogprobOut,
    MessageOut,
    Statistics,
    TokenLogprobOut,
    encoder,
)
from locopilot.settings import Settings

# Ollama's reasons: a reply that ends in tool calls ended with "stop" there.
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "cancelled": "stop"}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# Events → NDJSON


class OllamaFormatter:
    """``/api/chat`` (``chat``) or ``/api/generate`` objects of one reply; ``started_ns`` is when
    the handler began (``time.perf_counter_ns``). Made just before the request is routed."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, *, chat: bool, started_ns: int) -> None:
        self.model = model
        self.chat = chat
        self.started_ns = started_ns
        self.routed_ns = time.perf_counter_ns()
        self.first_ns = self.routed_ns
        self.calls = Reply()

    def _object(
        self,
        text: str,
        done: bool,
        stats: Statistics,
        calls: list[CallOut] | None = None,
        thinking: str = "",
        logprobs: Sequence[TokenLogprob] = (),
    ) -> ChatChunk | GenerateChunk:
        extra: dict[str, Any] = {f: getattr(stats, f) for f in stats.__struct_fields__}
        if logprobs:
            extra["logprobs"] = logprobs_out(logprobs)
        thought = thinking or msgspec.UNSET
        if self.chat:
            message = MessageOut(content=text, thinking=thought, tool_calls=calls or msgspec.UNSET)
            return ChatChunk(model=self.model, created_at=now_rfc3339(), message=message, done=done, **extra)
        return GenerateChunk(
            model=self.model, created_at=now_rfc3339(), response=text, thinking=thought, done=done, **extra
        )

    def _line(self, obj: ChatChunk | GenerateChunk) -> bytes:
        return encoder.encode(obj) + b"\n"

    def statistics(self, finish: Finish) -> Statistics:
        end = time.perf_counter_ns()
        load = int(finish.load_seconds * 1e9)
        return Statistics(
            done_reason=DONE_REASONS.get(finish.reason, finish.reason),
            total_duration=end - self.started_ns,
            load_duration=load,
            prompt_eval_count=finish.prompt_tokens,
            prompt_eval_duration=max(0, self.first_ns - self.routed_ns - load),
            eval_count=finish.completion_tokens,
            eval_duration=end - self.first_ns,
        )

    def opening(self) -> bytes:
        self.first_ns = time.perf_counter_ns()
        return b""

    def event(self, event: TextDelta | ToolCallDelta) -> bytes:
        if isinstance(event, TextDelta):
            if not (event.text or event.thinking or event.logprobs):
                return b""
            return self._line(
                self._object(event.text, False, Statistics(), thinking=event.thinking, logprobs=event.logprobs)
            )
        self.calls.add(event)  # sent whole once the reply is complete, as Ollama sends parsed calls
        return b""

    def closing(self, finish: Finish) -> bytes:
        calls = tool_calls_of(self.calls)
        lines = self._line(self._object("", False, Statistics(), calls)) if calls else b""
        return lines + self._line(self._object("", True, self.statistics(finish)))

    def failure(self, error: LocopilotError) -> bytes:
        return encoder.encode(OllamaErrorBody(error.message)) + b"\n"

    def whole(self, reply: Reply) -> ChatChunk | GenerateChunk:
        assert reply.finish is not None
        self.first_ns = reply.first_event_ns
        choice = reply.choices[0]
        return self._object(
            choice.content,
            True,
            self.statistics(reply.finish),
            tool_calls_of(reply),
            thinking=choice.reasoning,
            logprobs=choice.logprobs,
        )


def logprobs_out(logprobs: Sequence[TokenLogprob]) -> list[LogprobOut]:
    """Logprobs as Ollama writes them: each token's UTF-8 ``bytes`` beside it (none for an empty token)."""

    def raw(token: str, given: list[int] | None) -> list[int] | msgspec.UnsetType:
        return (given if given is not None else list(token.encode())) or msgspec.UNSET

    return [
        LogprobOut(
            token=each.token,
            logprob=each.logprob,
            bytes=raw(each.token, each.bytes),
            top_logprobs=[
                TokenLogprobOut(token=t.token, logprob=t.logprob, bytes=raw(t.token, t.bytes)) for t in each.top
            ]
            or msgspec.UNSET,
        )
        for each in logprobs
    ]


def tool_calls_of(reply: Reply) -> list[CallOut]:
    """The reply's calls with their arguments as objects (providers send only calls whose arguments parse)."""
    return [
        CallOut(function=FunctionCall(name=call.name, arguments=json.loads(call.arguments or "{}"), index=index))
        for index, call in enumerate(reply.choices[0].tool_calls())
    ]


# Where a model runs


async def embedded_name(router: Router, model: str) -> str | None:
    """The embedded engine's name for ``model`` (``name`` and ``name:latest`` are one), if it has one."""
    requested = router.default_model if model == "default" else model
    for prefix in ("embedded:", "embedded/"):
        requested = requested.removeprefix(prefix)
    state = router.states.get(EmbeddedProvider.name)
    names = await router.models_of(state) if state is not None else None
    return served_name(requested, names or [])


async def loaded_context(settings: Settings, catalog: ModelCatalog, name: str | None) -> int | None:
    """Tokens one request of embedded model ``name`` may hold; None for a routed model."""
    if name is None:
        return None
    if settings.ctx_size:
        return settings.ctx_size
    entry = await anyio.to_thread.run_sync(catalog.get, name)
    return entry.context_length


async def load_or_unload(
    pipeline: Pipeline,
    manager: ModelManager,
    request: Request[Any, Any, Any],
    model: str,
    keep: float | None,
    *,
    embedding: bool = False,
) -> str:
    """Ollama's request with nothing to generate: load the model (``"load"``) or, with ``keep_alive``
    0, unload it (``"unload"``). An Ollama upstream is asked to do that with its model (as an
    embedding model, ``embedding``); another upstream's model is only checked: it loads its models itself."""
    policy = privacy_of(request, pipeline.settings.routing_privacy)
    plan = await route_for(pipeline, request, model, policy)
    route = plan.routes[0]
    if isinstance(route.provider, KeepsModelsLoaded):
        return await route.provider.keep_loaded(route.model, keep, embedding=embedding)
    if not isinstance(route.provider, EmbeddedProvider):
        return "unload" if keep == 0 else "load"
    if keep == 0:
        await manager.expire(route.model)
        return "unload"
    await route.provider.load(route.model)
    manager.keep(route.model, keep)
    return "load"


def load_answer(model: str, reason: str, *, chat: bool) -> Response[bytes]:
    stats = Statistics(done_reason=reason)
    extra = {f: getattr(stats, f) for f in stats.__struct_fields__}
    now = now_rfc3339()
    obj: ChatChunk | GenerateChunk = (
        ChatChunk(model=model, created_at=now, message=MessageOut(), done=True, **extra)
        if chat
        else GenerateChunk(model=model, created_at=now, response="", done=True, **extra)
    )
    return Response(encoder.encode(obj), media_type="application/json")


# Routes


async def serve_ollama(
    pipeline: Pipeline,
    library: Library,
    request: Request[Any, Any, Any],
    data: ChatRequest | GenerateRequest,
    translate: Callable[[int | None], GenerationRequest],
) -> Response[bytes] | Stream:
    """``/api/chat`` and ``/api/generate``: with nothing to generate, Ollama's load or unload;
    otherwise ``translate(the model's loaded context)`` through the one pipeline, whose reply
    the Ollama formatter writes. ``keep_alive`` sets the embedded model's idle time."""
    started = time.perf_counter_ns()
    chat = isinstance(data, ChatRequest)
    keep = keep_alive_seconds(data.keep_alive)
    if not (data.messages if isinstance(data, ChatRequest) else data.prompt):
        return load_answer(
            data.model, await load_or_unload(pipeline, library.manager, request, data.model, keep), chat=chat
        )
    local = await embedded_name(library.router, data.model)
    context = await loaded_context(pipeline.settings, library.catalog, local)

    def build() -> GenerationRequest:
        generation = translate(context)
        if local is not None:
            library.manager.keep(local, keep)
        return msgspec.structs.replace(generation, keep_alive=keep)

    return await serve_generation(
        pipeline,
        request,
        endpoint="ollama.chat" if chat else "ollama.generate",
        id_prefix="ollama",
        model=data.model,
        stream=data.stream,
        build=build,
        formatter=lambda _: OllamaFormatter(data.model, chat=chat, started_ns=started),
    )


@post("/api/chat", status_code=200, responses=answers(ChatChunk, 200, *GUARDED, *BODY, *ROUTED, front="ollama"))
async def chat(
    data: ChatRequest, pipeline: Pipeline, library: Library, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    limit = pipeline.settings.max_message_bytes
    return await serve_ollama(pipeline, library, request, data, lambda context: chat_generation(data, limit, context))


@post("/api/generate", status_code=200, responses=answers(GenerateChunk, 200, *GUARDED, *BODY, *ROUTED, front="ollama"))
async def generate(
    data: GenerateRequest, pipeline: Pipeline, library: Library, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    limit = pipeline.settings.max_message_bytes
    return await serve_ollama(
        pipeline, library, request, data, lambda context: generate_generation(data, limit, context)
    )


def embed_texts(inputs: list[str], max_text: int, param: str) -> list[str]:
    for index, text in enumerate(inputs):
        if not text:
            raise InvalidRequest(f"{param}[{index}] is an empty string", param=param)
        check_text_size(text, max_text, f"{param}[{index}]")
    return inputs


async def keep_embedded(library: Library, model: str, keep: float | None) -> str | None:
    """The embedded engine's name for ``model`` (None: not one of its models), whose idle time is
    now ``keep`` (Ollama's ``keep_alive`` in seconds; None: the server's default)."""
    local = await embedded_name(library.router, model)
    if local is not None:
        library.manager.keep(local, keep)
    return local


def embedded_load_seconds(manager: ModelManager, local: str | None, since: float) -> float:
    runner = manager.runners.get(local) if local is not None else None
    return runner.load_seconds if runner is not None and runner.loaded_at >= since else 0.0


@post("/api/embed", status_code=200, responses=answers(EmbedResponse, 200, *GUARDED, *BODY, *ROUTED, front="ollama"))
async def embed(
    data: EmbedRequest, pipeline: Pipeline, library: Library, request: Request[Any, Any, Any]
) -> Response[bytes]:
    started, began = time.perf_counter_ns(), library.manager.clock()
    keep = keep_alive_seconds(data.keep_alive)
    inputs = ([data.input] if data.input else []) if isinstance(data.input, str) else list(data.input)
    if data.dimensions is not None:
        raise InvalidRequest("dimensions is not supported", param="dimensions")
    if not inputs:
        await load_or_unload(pipeline, library.manager, request, data.model, keep, embedding=True)
        empty = EmbedResponse(
            model=data.model,
            embeddings=[],
            total_duration=time.perf_counter_ns() - started,
            load_duration=0,
            prompt_eval_count=0,
        )
        return Response(encoder.encode(empty), media_type="application/json")
    local = await keep_embedded(library, data.model, keep)
    _, result, headers = await serve_embedding(
        pipeline,
        request,
        endpoint="ollama.embed",
        id_prefix="ollama",
        model=data.model,
        inputs=lambda: embed_texts(inputs, pipeline.settings.max_message_bytes, "input"),
    )
    load = embedded_load_seconds(library.manager, local, began)
    body = EmbedResponse(
        model=data.model,
        embeddings=result.vectors,
        total_duration=time.perf_counter_ns() - started,
        load_duration=int(load * 1e9),
        prompt_eval_count=result.prompt_tokens,
    )
    return Response(encoder.encode(body), media_type="application/json", headers=headers)


@post(
    "/api/embeddings",
    status_code=200,
    responses=answers(EmbeddingsResponse, 200, *GUARDED, *BODY, *ROUTED, front="ollama"),
)
async def embeddings(
    data: EmbeddingsRequest, pipeline: Pipeline, library: Library, request: Request[Any, Any, Any]
) -> Response[bytes]:
    keep = keep_alive_seconds(data.keep_alive)
    if not data.prompt:
        await load_or_unload(pipeline, library.manager, request, data.model, keep, embedding=True)
        return Response(encoder.encode(EmbeddingsResponse(embedding=[])), media_type="application/json")
    await keep_embedded(library, data.model, keep)
    _, result, headers = await serve_embedding(
        pipeline,
        request,
        endpoint="ollama.embeddings",
        id_prefix="ollama",
        model=data.model,
        inputs=lambda: embed_texts([data.prompt], pipeline.settings.max_message_bytes, "prompt"),
    )
    body = EmbeddingsResponse(embedding=result.vectors[0])
    return Response(encoder.encode(body), media_type="application/json", headers=headers)


ROUTES = [chat, generate, embed, embeddings]
