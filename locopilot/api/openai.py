"""OpenAI-compatible routes. Each handler reads top to bottom: check, route, stream, record."""

from __future__ import annotations

import array
import base64
import json
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from locopilot.api.generation import serve_embedding, serve_generation
from locopilot.api.responses import BODY, GUARDED, ROUTED, answers
from locopilot.api.services import Services
from locopilot.api.tools import check_schema_bounds
from locopilot.engine.protocol import SamplingParams
from locopilot.errors import InvalidRequest, LocopilotError, ModelNotFound
from locopilot.gateway.auth import Principal, principal_of
from locopilot.gateway.streaming import Reply, sse, usage_of
from locopilot.models.catalog import ModelEntry, validate_model_name
from locopilot.providers.base import (
    Finish,
    GenerationRequest,
    Message,
    TextDelta,
    ToolCallDelta,
)
from locopilot.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ImageUrlPart,
    ModelCard,
    ModelList,
    SamplingFields,
    TextPart,
    Usage,
    encoder,
)
from locopilot.training.lineage import Lineage
from locopilot.training.lineage import read as read_lineage

MAX_EMBEDDING_INPUTS = 2048


# Request → GenerationRequest


def sampling_params(body: SamplingFields) -> SamplingParams:
    defaults = SamplingParams()
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        min_p=defaults.min_p if body.min_p is None else body.min_p,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repeat_penalty=defaults.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
        seed=body.seed,
        logit_bias=bias,
    )


def check_common(body: SamplingFields) -> None:
    if body.n != 1:
        raise InvalidRequest("Only n=1 is supported.", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported.", param="logprobs")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_text_size(text: str, limit: int, param: str) -> str:
    """``text`` if its UTF-8 form fits in ``limit`` bytes (LOCOPILOT_MAX_MESSAGE_BYTES), else InvalidRequest."""
    # Four bytes per character at most: most texts are cleared without encoding them.
    if len(text) * 4 > limit and len(text.encode(errors="surrogatepass")) > limit:
        raise InvalidRequest(
            f"{param} is longer than {limit} bytes (LOCOPILOT_MAX_MESSAGE_BYTES).",
            param=param,
            code="string_above_max_length",
        )
    return text


def message_text(index: int, message: ChatMessage, limit: int) -> str:
    match message.content:
        case None:
            return ""
        case str(text):
            return check_text_size(text, limit, f"messages[{index}].content")
        case parts:
            texts: list[str] = []
            for part in parts:
                if not isinstance(part, TextPart):
                    kind = "image" if isinstance(part, ImageUrlPart) else "audio"
                    raise InvalidRequest(
                        f"messages[{index}] has {kind} content, which this model cannot read",
                        param=f"messages[{index}].content",
                    )
                texts.append(part.text)
            return check_text_size("\n".join(texts), limit, f"messages[{index}].content")


def chat_generation(body: ChatCompletionRequest, model: str, max_text: int) -> GenerationRequest:
    """The generation ``body`` asks for; ``max_text`` bounds each message's text in bytes."""
    check_common(body)
    if body.tools:
        raise InvalidRequest("tools are not supported yet.", param="tools")
    messages = [
        Message(role="system" if m.role == "developer" else m.role, content=message_text(i, m, max_text))
        for i, m in enumerate(body.messages)
    ]
    json_schema = None
    if body.response_format is not None:
        match body.response_format.type:
            case "json_object":
                json_schema = '{"type": "object"}'
            case "json_schema":
                spec = body.response_format.json_schema
                if spec is None or spec.schema is None:
                    raise InvalidRequest(
                        "response_format.json_schema.schema is required", param="response_format.json_schema"
                    )
                check_schema_bounds(spec.schema, "response_format")
                json_schema = json.dumps(spec.schema)
    return GenerationRequest(
        model=model,
        messages=messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=stop_list(body.stop),
        json_schema=json_schema,
        sampling=sampling_params(body),
    )


def completion_generation(body: CompletionRequest, model: str, max_text: int) -> GenerationRequest:
    """The generation ``body`` asks for; ``max_text`` bounds the prompt in bytes."""
    check_common(body)
    match body.prompt:
        case str(text):
            prompt = text
        case [str(text)]:
            prompt = text
        case [str(), str(), *_]:
            raise InvalidRequest("Only one prompt per request is supported.", param="prompt")
        case _:
            raise InvalidRequest("prompt must be a string; token arrays are not supported.", param="prompt")
    check_text_size(prompt, max_text, "prompt")
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported.", param="suffix")
    if body.best_of not in (None, 1):
        raise InvalidRequest("best_of is not supported.", param="best_of")
    return GenerationRequest(
        model=model,
        prompt=prompt,
        max_tokens=body.max_tokens or 16,  # OpenAI's default for text completions
        stop=stop_list(body.stop),
        echo=body.echo,
        sampling=sampling_params(body),
    )


# Wire formatters


class ReplyIdentity:
    """What every chunk of one reply repeats; ``usage`` is null on each chunk when the client asked for usage."""

    media_type = "text/event-stream"

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.usage: Usage | msgspec.UnsetType | None = None if include_usage else msgspec.UNSET

    def failure(self, error: LocopilotError) -> bytes:
        return sse(error.body())

    def _end(self, finish: Finish, chunks: list[msgspec.Struct]) -> bytes:
        """The finish chunks, the usage chunk when asked for, and the end marker."""
        if self.include_usage:
            chunks.append(self.usage_chunk(usage_of(finish)))
        return b"".join(map(sse, chunks)) + b"data: [DONE]\n\n"

    def usage_chunk(self, usage: Usage) -> msgspec.Struct:
        raise NotImplementedError


def choice_reasons(finish: Finish, n: int) -> list[str]:
    """Each of ``n`` choices' finish reason."""
    if finish.reasons:
        return list(finish.reasons)
    return [finish.reason] * n


class ChatFormatter(ReplyIdentity):
    def __init__(self, request_id: str, model: str, include_usage: bool, n: int = 1) -> None:
        super().__init__(request_id, model, include_usage)
        self.n = n

    def _chunk(self, delta: ChatDelta, finish: str | None = None, index: int = 0) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index, delta, finish)
        return ChatCompletionChunk(self.request_id, self.created, self.model, [choice], usage=self.usage)

    def opening(self) -> bytes:
        return b"".join(sse(self._chunk(ChatDelta(role="assistant", content=""), index=i)) for i in range(self.n))

    def event(self, event: TextDelta | ToolCallDelta) -> bytes:
        if isinstance(event, TextDelta):
            return sse(self._chunk(ChatDelta(content=event.text), index=event.index))
        raise NotImplementedError("tool call deltas")

    def closing(self, finish: Finish) -> bytes:
        reasons = choice_reasons(finish, self.n)
        return self._end(finish, [self._chunk(ChatDelta(), reason, i) for i, reason in enumerate(reasons)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.request_id, self.created, self.model, [], usage=usage)

    def whole(self, reply: Reply) -> ChatCompletion:
        choices = [
            ChatChoice(i, AssistantMessage(choice.content), reply.reason(i)) for i, choice in enumerate(reply.choices)
        ]
        return ChatCompletion(self.request_id, self.created, self.model, choices, reply.usage)


class CompletionFormatter(ReplyIdentity):
    def __init__(self, request_id: str, model: str, include_usage: bool, n: int = 1) -> None:
        super().__init__(request_id, model, include_usage)
        self.n = n

    def _chunk(self, text: str, finish: str | None = None, index: int = 0) -> Completion:
        choice = CompletionChoice(index, text, finish)
        return Completion(self.request_id, self.created, self.model, [choice], usage=self.usage)

    def opening(self) -> bytes:
        return b""

    def event(self, event: TextDelta | ToolCallDelta) -> bytes:
        if isinstance(event, TextDelta):
            return sse(self._chunk(event.text, index=event.index))
        return b""  # a text completion has no tools

    def closing(self, finish: Finish) -> bytes:
        reasons = choice_reasons(finish, self.n)
        return self._end(finish, [self._chunk("", reason, i) for i, reason in enumerate(reasons)])

    def usage_chunk(self, usage: Usage) -> Completion:
        return Completion(self.request_id, self.created, self.model, [], usage=usage)

    def whole(self, reply: Reply) -> Completion:
        choices = [CompletionChoice(i, choice.content, reply.reason(i)) for i, choice in enumerate(reply.choices)]
        return Completion(self.request_id, self.created, self.model, choices, usage=reply.usage)


# Routes


@post("/v1/chat/completions", status_code=200, responses=answers(ChatCompletion, 200, *GUARDED, *BODY, *ROUTED))
async def chat_completions(
    data: ChatCompletionRequest, services: Services, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    include_usage = bool(data.stream and data.stream_options and data.stream_options.include_usage)
    return await serve_generation(
        services,
        request,
        endpoint="chat.completions",
        id_prefix="chatcmpl",
        model=data.model,
        stream=data.stream,
        build=lambda: chat_generation(data, data.model, services.settings.max_message_bytes),
        formatter=lambda request_id: ChatFormatter(request_id, data.model, include_usage, data.n),
    )


@post("/v1/completions", status_code=200, responses=answers(Completion, 200, *GUARDED, *BODY, *ROUTED))
async def completions(
    data: CompletionRequest, services: Services, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    include_usage = bool(data.stream and data.stream_options and data.stream_options.include_usage)
    return await serve_generation(
        services,
        request,
        endpoint="completions",
        id_prefix="cmpl",
        model=data.model,
        stream=data.stream,
        build=lambda: completion_generation(data, data.model, services.settings.max_message_bytes),
        formatter=lambda request_id: CompletionFormatter(request_id, data.model, include_usage, data.n),
    )


def embedding_inputs(body: EmbeddingRequest, max_text: int) -> list[str]:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise InvalidRequest("input must not be empty.", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"input may have at most {MAX_EMBEDDING_INPUTS} items.", param="input")
    texts: list[str] = []
    for index, item in enumerate(inputs):
        if not isinstance(item, str):
            raise InvalidRequest("input must be strings; token arrays are not supported.", param="input")
        if not item:
            raise InvalidRequest(f"input[{index}] is an empty string.", param="input")
        texts.append(check_text_size(item, max_text, f"input[{index}]"))
    if body.dimensions is not None:
        raise InvalidRequest("dimensions is not supported.", param="dimensions")
    return texts


@post("/v1/embeddings", status_code=200, responses=answers(EmbeddingList, 200, *GUARDED, *BODY, *ROUTED))
async def embeddings(data: EmbeddingRequest, services: Services, request: Request[Any, Any, Any]) -> Response[bytes]:
    _, result, headers = await serve_embedding(
        services,
        request,
        endpoint="embeddings",
        id_prefix="emb",
        model=data.model,
        inputs=lambda: embedding_inputs(data, services.settings.max_message_bytes),
    )
    data_items = [
        EmbeddingData(i, base64.b64encode(_float32(v)).decode() if data.encoding_format == "base64" else v)
        for i, v in enumerate(result.vectors)
    ]
    body = EmbeddingList(data_items, data.model, EmbeddingUsage(result.prompt_tokens, result.prompt_tokens))
    return Response(encoder.encode(body), media_type="application/json", headers=headers)


def _float32(vector: list[float]) -> bytes:
    return array.array("f", vector).tobytes()


def model_card(entry: ModelEntry, loaded: bool, lineage: Lineage | None = None) -> ModelCard:
    return ModelCard(
        id=entry.name,
        created=entry.modified,
        owned_by="locopilot",
        size_bytes=entry.size_bytes,
        architecture=entry.architecture,
        quantization=entry.quantization,
        parameter_count=entry.parameter_count,
        context_length=entry.context_length,
        chat_template=entry.chat_template,
        loaded=loaded,
        error=entry.error,
        lineage=lineage,
    )


async def all_cards(services: Services, principal: Principal) -> list[ModelCard]:
    """Embedded models, then each upstream's (cached by the router) in priority order; first name wins.

    Only the models ``principal``'s allowlist admits.
    """
    loaded = set(services.manager.loaded())
    # Reading headers (and lineage manifests) touches every model file: not on the event loop.
    entries = await anyio.to_thread.run_sync(services.catalog.list)
    lineages = await anyio.to_thread.run_sync(lambda: [read_lineage(Path(entry.path)) for entry in entries])
    embedded = (model_card(entry, entry.name in loaded, found) for entry, found in zip(entries, lineages, strict=True))
    cards = [card for card in embedded if services.auth.allows(principal, card.provider, card.id)]
    seen = {card.id for card in cards}
    for state in services.router.ordered("any"):
        provider = state.provider
        if state.local_engine:
            continue
        for name in await services.router.models_of(state) or []:
            if name not in seen and services.auth.allows(principal, provider.name, name):
                seen.add(name)
                cards.append(ModelCard(name, 0, provider.name, provider=provider.name, locality=provider.locality))
    return cards


@get("/v1/models", responses=answers(ModelList, 200, *GUARDED, 502, 503))
async def list_models(services: Services, request: Request[Any, Any, Any]) -> Response[bytes]:
    cards = await all_cards(services, principal_of(request))
    return Response(encoder.encode(ModelList(cards)), media_type="application/json")


@get("/v1/models/{model_id:path}", responses=answers(ModelCard, 200, *GUARDED, 400, 404, 502, 503))
async def get_model(model_id: str, services: Services, request: Request[Any, Any, Any]) -> Response[bytes]:
    """One model by id, plain (``llama3.2:1b``) or with its provider (``ollama:llama3.2:1b``)."""
    model_id = model_id.lstrip("/")
    cards = await all_cards(services, principal_of(request))
    for card in cards:
        if model_id in (card.id, f"{card.provider}:{card.id}", f"{card.provider}/{card.id}"):
            return Response(encoder.encode(card), media_type="application/json")
    validate_model_name(model_id.split("/", 1)[-1])
    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")


ROUTES = [chat_completions, completions, embeddings, list_models, get_model]
