"""OpenAI-compatible routes. Each handler reads top to bottom: check, route, stream, record."""

from __future__ import annotations

import array
import base64
import codecs
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from locopilot.api.generation import privacy_of, provider_headers, serve_generation
from locopilot.api.responses import BODY, GUARDED, ROUTED, answers
from locopilot.api.services import Services
from locopilot.api.tools import check_schema_bounds
from locopilot.engine.protocol import SamplingParams
from locopilot.errors import InvalidRequest, LocopilotError, ModelNotFound
from locopilot.gateway.access import outcome_id
from locopilot.gateway.auth import Principal, principal_of
from locopilot.gateway.failover import first_success
from locopilot.gateway.router import Route
from locopilot.gateway.streaming import ChoiceParts, Reply, sse, unless_disconnected, usage_of
from locopilot.gateway.usage import Outcome
from locopilot.models.catalog import ModelEntry, validate_model_name
from locopilot.providers.base import (
    EmbeddingResult,
    Finish,
    GenerationRequest,
    Message,
    TextDelta,
    TokenLogprob,
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
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
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


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """How many alternatives a chat asks for beside each token's own logprob; None: no logprobs."""
    if body.logprobs is not None and not isinstance(body.logprobs, bool):
        raise InvalidRequest(
            "logprobs must be true or false here; top_logprobs says how many alternatives (0-20).", param="logprobs"
        )
    if not body.logprobs:
        if body.top_logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        return None
    return body.top_logprobs or 0


def completion_logprobs(body: CompletionRequest) -> int | None:
    """A text completion's ``logprobs``: how many alternatives (0-20) beside each token's own; None: none."""
    match body.logprobs:
        case None | False:
            return None
        case True:
            raise InvalidRequest("logprobs must be a number of alternatives (0-20) here.", param="logprobs")
        case count:
            return count


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
    logprobs = chat_logprobs(body)
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
        logprobs=logprobs,
        n=body.n,
        sampling=sampling_params(body),
    )


def completion_generation(body: CompletionRequest, model: str, max_text: int) -> GenerationRequest:
    """The generation ``body`` asks for; ``max_text`` bounds the prompt and the suffix in bytes."""
    logprobs = completion_logprobs(body)
    prompt = prompt_text(body)
    check_text_size(prompt, max_text, "prompt")
    # An empty suffix asks for nothing to fill before: a plain completion (any model can do that).
    suffix = check_text_size(body.suffix, max_text, "suffix") if body.suffix else None
    if body.best_of not in (None, 1):
        raise InvalidRequest("best_of is not supported.", param="best_of")
    return GenerationRequest(
        model=model,
        prompt=prompt,
        suffix=suffix,
        max_tokens=body.max_tokens or 16,  # OpenAI's default for text completions
        stop=stop_list(body.stop),
        echo=body.echo,
        logprobs=logprobs,
        n=body.n,
        sampling=sampling_params(body),
    )


def prompt_text(body: CompletionRequest) -> str:
    match body.prompt:
        case str(text):
            return text
        case [str(text)]:
            return text
        case [str(), str(), *_]:
            raise InvalidRequest("Only one prompt per request is supported.", param="prompt")
        case _:
            raise InvalidRequest("prompt must be a string; token arrays are not supported.", param="prompt")


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


def padded(reply: Reply, n: int) -> list[ChoiceParts]:
    """Each of ``n`` choices' parts: one that sent nothing at all still gets its choice."""
    return reply.choices + [ChoiceParts() for _ in range(n - len(reply.choices))]


def chat_logprobs_of(logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        [
            ChatTokenLogprob(
                each.token, each.logprob, each.bytes, [ChatTopLogprob(t.token, t.logprob, t.bytes) for t in each.top]
            )
            for each in logprobs
        ]
    )


class ChatFormatter(ReplyIdentity):
    """``logprobs``: the request asked for them (each choice then carries ``logprobs.content``)."""

    def __init__(self, request_id: str, model: str, include_usage: bool, n: int = 1, logprobs: bool = False) -> None:
        super().__init__(request_id, model, include_usage)
        self.n = n
        self.logprobs = logprobs

    def _chunk(
        self, delta: ChatDelta, finish: str | None = None, index: int = 0, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index, delta, finish, logprobs)
        return ChatCompletionChunk(self.request_id, self.created, self.model, [choice], usage=self.usage)

    def opening(self) -> bytes:
        return b"".join(sse(self._chunk(ChatDelta(role="assistant", content=""), index=i)) for i in range(self.n))

    def event(self, event: TextDelta | ToolCallDelta) -> bytes:
        if isinstance(event, TextDelta):
            logprobs = chat_logprobs_of(event.logprobs) if self.logprobs and event.logprobs else None
            return sse(self._chunk(ChatDelta(content=event.text), index=event.index, logprobs=logprobs))
        raise NotImplementedError("tool call deltas")

    def closing(self, finish: Finish) -> bytes:
        reasons = choice_reasons(finish, self.n)
        return self._end(finish, [self._chunk(ChatDelta(), reason, i) for i, reason in enumerate(reasons)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.request_id, self.created, self.model, [], usage=usage)

    def whole(self, reply: Reply) -> ChatCompletion:
        choices = [
            ChatChoice(
                i,
                AssistantMessage(choice.content),
                reply.reason(i),
                chat_logprobs_of(choice.logprobs) if self.logprobs else None,
            )
            for i, choice in enumerate(padded(reply, self.n))
        ]
        return ChatCompletion(self.request_id, self.created, self.model, choices, reply.usage)


class CompletionFormatter(ReplyIdentity):
    """``logprobs``: the request asked for them; ``prompt_chars``: the prompt's length, where
    ``text_offset`` starts counting the generated text (as OpenAI counts it, from the prompt's start)."""

    def __init__(
        self,
        request_id: str,
        model: str,
        include_usage: bool,
        n: int = 1,
        logprobs: bool = False,
        prompt_chars: int = 0,
    ) -> None:
        super().__init__(request_id, model, include_usage)
        self.n = n
        self.logprobs = logprobs
        self.prompt_chars = prompt_chars
        self.offsets: dict[int, TextOffsets] = {}

    def _chunk(
        self, text: str, finish: str | None = None, index: int = 0, logprobs: CompletionLogprobs | None = None
    ) -> Completion:
        choice = CompletionChoice(index, text, finish, logprobs)
        return Completion(self.request_id, self.created, self.model, [choice], usage=self.usage)

    def _logprobs(self, index: int, logprobs: Sequence[TokenLogprob]) -> CompletionLogprobs:
        """The next tokens of choice ``index`` in the legacy form; offsets go on from its previous tokens."""
        offsets = self.offsets.setdefault(index, TextOffsets(self.prompt_chars))
        return CompletionLogprobs(
            tokens=[each.token for each in logprobs],
            token_logprobs=[each.logprob for each in logprobs],
            # OpenAI: the token's own logprob is always among them (so up to logprobs + 1 entries).
            top_logprobs=[{t.token: t.logprob for t in each.top} | {each.token: each.logprob} for each in logprobs],
            text_offset=[offsets.next(each) for each in logprobs],
        )

    def opening(self) -> bytes:
        return b""

    def event(self, event: TextDelta | ToolCallDelta) -> bytes:
        if isinstance(event, TextDelta):
            logprobs = self._logprobs(event.index, event.logprobs) if self.logprobs and event.logprobs else None
            return sse(self._chunk(event.text, index=event.index, logprobs=logprobs))
        return b""  # a text completion has no tools

    def closing(self, finish: Finish) -> bytes:
        reasons = choice_reasons(finish, self.n)
        return self._end(finish, [self._chunk("", reason, i) for i, reason in enumerate(reasons)])

    def usage_chunk(self, usage: Usage) -> Completion:
        return Completion(self.request_id, self.created, self.model, [], usage=usage)

    def whole(self, reply: Reply) -> Completion:
        choices = [
            CompletionChoice(
                i, choice.content, reply.reason(i), self._logprobs(i, choice.logprobs) if self.logprobs else None
            )
            for i, choice in enumerate(padded(reply, self.n))
        ]
        return Completion(self.request_id, self.created, self.model, choices, usage=reply.usage)


class TextOffsets:
    """Where each token's text starts, in characters: its bytes decoded as the engine decodes
    them, so a character split over two tokens counts once, at the token that completes it."""

    def __init__(self, start: int) -> None:
        self.position = start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token: TokenLogprob) -> int:
        """``token``'s offset; moves past its text."""
        offset = self.position
        self.position += len(self.decoder.decode(bytes(token.bytes))) if token.bytes is not None else len(token.token)
        return offset


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
        formatter=lambda request_id: ChatFormatter(request_id, data.model, include_usage, data.n, bool(data.logprobs)),
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
        formatter=lambda request_id: CompletionFormatter(
            request_id,
            data.model,
            include_usage,
            data.n,
            logprobs=data.logprobs is not None and data.logprobs is not False,
            prompt_chars=len(prompt_text(data)),  # checked by the build step, which runs first
        ),
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
    request_id = outcome_id(request.scope, "emb")
    principal = principal_of(request)
    outcome = Outcome(request_id, "embeddings", data.model, key_id=principal.key_id)
    async with services.recorder.recording(outcome):
        admission = outcome.admission = services.limiter.admit(principal)
        inputs = embedding_inputs(data, services.settings.max_message_bytes)
        if services.settings.log_prompts:
            outcome.keep_text(inputs, reply=False)
        policy = privacy_of(request, services.settings.routing_privacy)
        plan = await services.auth.plan(request, services.router, data.model, policy)
        outcome.routing = plan.decision

        async def attempt(route: Route) -> EmbeddingResult:
            return await route.provider.embed(route.model, inputs)

        route, result = await unless_disconnected(
            request.receive, lambda: first_success(services.router, plan, attempt), services.shutdown
        )
        outcome.model, outcome.provider = route.model, route.provider.name
    outcome.tokens_in = result.prompt_tokens
    await services.recorder.settle(outcome)
    data_items = [
        EmbeddingData(i, base64.b64encode(_float32(v)).decode() if data.encoding_format == "base64" else v)
        for i, v in enumerate(result.vectors)
    ]
    body = EmbeddingList(data_items, data.model, EmbeddingUsage(result.prompt_tokens, result.prompt_tokens))
    return Response(
        encoder.encode(body),
        media_type="application/json",
        headers={**provider_headers(route.provider.name, route.model), **admission.headers()},
    )


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
