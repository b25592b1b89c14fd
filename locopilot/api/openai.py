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

from locopilot.api.generation import serve_embedding, serve_generation
from locopilot.api.responses import BODY, GUARDED, ROUTED, answers
from locopilot.api.services import Library, Pipeline
from locopilot.api.tools import check_schema_bounds, check_tools
from locopilot.engine.protocol import SamplingParams, sampling_of
from locopilot.errors import InvalidRequest, LocopilotError, ModelNotFound
from locopilot.gateway.auth import Principal, principal_of
from locopilot.gateway.streaming import ChoiceParts, Reply, sse, usage_of
from locopilot.models.catalog import validate_model_name
from locopilot.providers.base import (
    Finish,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    Message,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from locopilot.schemas import anthropic as anthropic_wire
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
    FunctionCall,
    FunctionCallDelta,
    ImageUrlPart,
    ModelCard,
    ModelList,
    NamedToolChoice,
    SamplingFields,
    TextPart,
    ToolCallChunk,
    ToolCallOut,
    ToolChoiceSpec,
    ToolSpec,
    Usage,
    encoder,
    model_card,
)
from locopilot.store import models as model_records
from locopilot.training.lineage import read as read_lineage

MAX_EMBEDDING_INPUTS = 2048


# Request → GenerationRequest


def sampling_params(body: SamplingFields) -> SamplingParams:
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return sampling_of(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty,
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


def chat_message(index: int, message: ChatMessage, limit: int) -> Message:
    """``message`` as the internal Message: its text (at most ``limit`` bytes), images and tool calls."""
    where = f"messages[{index}]"
    texts: list[str] = []
    images: list[ImagePart] = []
    match message.content:
        case None:
            pass
        case str(text):
            texts.append(text)
        case parts:
            for part in parts:
                match part:
                    case TextPart(text=text):
                        texts.append(text)
                    case ImageUrlPart(image_url=image):
                        if message.role != "user":
                            raise InvalidRequest(
                                f"Only user messages may carry images, not {message.role} ones.",
                                param=f"{where}.content",
                            )
                        images.append(ImagePart(url=image.url, detail=image.detail))
                    case _:
                        raise InvalidRequest(
                            f"{where} has audio content, which is not supported.", param=f"{where}.content"
                        )
    calls = tuple(
        ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
        for call in message.tool_calls or ()
    )
    if calls and message.role != "assistant":
        raise InvalidRequest("Only assistant messages may carry tool_calls.", param=f"{where}.tool_calls")
    if message.tool_call_id is not None and message.role != "tool":
        raise InvalidRequest("Only tool messages may carry a tool_call_id.", param=f"{where}.tool_call_id")
    return Message(
        role="system" if message.role == "developer" else message.role,
        content=check_text_size("\n".join(texts), limit, f"{where}.content"),
        images=tuple(images),
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def function_tools(tools: list[ToolSpec]) -> tuple[FunctionTool, ...]:
    """The declared tools; only ``function`` tools exist on this API."""
    declared: list[FunctionTool] = []
    for index, tool in enumerate(tools):
        if tool.type != "function":
            raise InvalidRequest(
                f"Tools of type {tool.type!r} are not supported; only function tools are.", param=f"tools[{index}].type"
            )
        spec = tool.function
        declared.append(
            FunctionTool(
                name=spec.name,
                description=spec.description,
                # Absent or {}: a function without arguments, as OpenAI reads it.
                parameters=spec.parameters or {"type": "object", "properties": {}},
                strict=spec.strict,
            )
        )
    return tuple(declared)


def tool_choice(choice: ToolChoiceSpec | None) -> ToolChoice:
    match choice:
        case None:
            return ToolChoice()
        case NamedToolChoice(function=function):
            return ToolChoice(mode="function", name=function.name)
        case mode:
            return ToolChoice(mode=mode)


def chat_generation(body: ChatCompletionRequest, model: str, max_text: int) -> GenerationRequest:
    """The generation ``body`` asks for; ``max_text`` bounds each message's text in bytes."""
    logprobs = chat_logprobs(body)
    messages = [chat_message(i, m, max_text) for i, m in enumerate(body.messages)]
    tools = function_tools(body.tools or [])
    choice = tool_choice(body.tool_choice)
    check_tools(tools, choice, messages)
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
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        logprobs=logprobs,
        n=body.n,
        sampling=sampling_params(body),
    )


def prompt_of(prompt: str | list[str | int | list[int]], max_text: int) -> tuple[str | None, list[int] | None]:
    """One prompt, as text or as token ids (``[1, 2]`` or ``[[1, 2]]``), at most ``max_text`` bytes."""
    if isinstance(prompt, str):
        return check_text_size(prompt, max_text, "prompt"), None
    tokens: list[int] = []
    match prompt:
        case [str(text)]:
            return check_text_size(text, max_text, "prompt"), None
        case [list(ids)]:
            tokens = ids
        case [int(), *_]:
            tokens = [token for token in prompt if isinstance(token, int)]
            if len(tokens) != len(prompt):
                raise InvalidRequest("prompt mixes token ids with other items.", param="prompt")
        case [str() | list(), _, *_]:
            raise InvalidRequest("Only one prompt per request is supported.", param="prompt")
    if not tokens:
        raise InvalidRequest("prompt must not be empty.", param="prompt")
    # Every token is at least one byte of text.
    if len(tokens) > max_text:
        raise InvalidRequest(
            f"prompt has more than {max_text} tokens (LOCOPILOT_MAX_MESSAGE_BYTES).",
            param="prompt",
            code="string_above_max_length",
        )
    if min(tokens) < 0:
        raise InvalidRequest("prompt token ids must not be negative.", param="prompt")
    return None, tokens


def completion_generation(body: CompletionRequest, model: str, max_text: int) -> GenerationRequest:
    """The generation ``body`` asks for; ``max_text`` bounds the prompt and the suffix in bytes."""
    logprobs = completion_logprobs(body)
    prompt, tokens = prompt_of(body.prompt, max_text)
    # An empty suffix asks for nothing to fill before: a plain completion (any model can do that).
    suffix = check_text_size(body.suffix, max_text, "suffix") if body.suffix else None
    if body.best_of not in (None, 1):
        raise InvalidRequest("best_of is not supported.", param="best_of")
    return GenerationRequest(
        model=model,
        prompt=prompt,
        prompt_tokens=tokens,
        suffix=suffix,
        max_tokens=body.max_tokens or 16,  # OpenAI's default for text completions
        stop=stop_list(body.stop),
        echo=body.echo,
        logprobs=logprobs,
        n=body.n,
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
        self,
        delta: ChatDelta,
        finish: str | None = None,
        index: int = 0,
        stop: str | None = None,
        logprobs: ChatLogprobs | None = None,
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index, delta, finish, logprobs, stop_reason=msgspec.UNSET if stop is None else stop)
        return ChatCompletionChunk(self.request_id, self.created, self.model, [choice], usage=self.usage)

    def opening(self) -> bytes:
        return b"".join(sse(self._chunk(ChatDelta(role="assistant", content=""), index=i)) for i in range(self.n))

    def event(self, event: TextDelta | ToolCallDelta) -> bytes:
        if isinstance(event, TextDelta):
            logprobs = chat_logprobs_of(event.logprobs) if self.logprobs and event.logprobs else None
            return sse(self._chunk(ChatDelta(content=event.text), index=event.index, logprobs=logprobs))
        if event.id is None and event.name is None:
            return self._call_chunk(event, ToolCallChunk(event.call, FunctionCallDelta(arguments=event.arguments)))
        # A call's first piece says what it calls, with empty arguments; the arguments follow
        # in pieces of their own, as OpenAI streams them.
        opening = ToolCallChunk(
            event.call, FunctionCallDelta(name=event.name or "", arguments=""), id=event.id or "", type="function"
        )
        data = self._call_chunk(event, opening)
        if event.arguments:
            data += self._call_chunk(event, ToolCallChunk(event.call, FunctionCallDelta(arguments=event.arguments)))
        return data

    def _call_chunk(self, event: ToolCallDelta, call: ToolCallChunk) -> bytes:
        return sse(self._chunk(ChatDelta(tool_calls=[call]), index=event.index))

    def closing(self, finish: Finish) -> bytes:
        reasons = choice_reasons(finish, self.n)
        chunks: list[msgspec.Struct] = [
            self._chunk(ChatDelta(), reason, i, finish.stop if i == 0 else None) for i, reason in enumerate(reasons)
        ]
        return self._end(finish, chunks)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.request_id, self.created, self.model, [], usage=usage)

    def whole(self, reply: Reply) -> ChatCompletion:
        stop = reply.finish.stop if reply.finish is not None and reply.finish.stop is not None else msgspec.UNSET
        choices = [
            ChatChoice(
                i,
                assistant_message(choice),
                reply.reason(i),
                chat_logprobs_of(choice.logprobs) if self.logprobs else None,
                stop_reason=stop if i == 0 else msgspec.UNSET,
            )
            for i, choice in enumerate(padded(reply, self.n))
        ]
        return ChatCompletion(self.request_id, self.created, self.model, choices, reply.usage)


def assistant_message(choice: ChoiceParts) -> AssistantMessage:
    """A choice as OpenAI writes it: with its calls, and null content when it is only calls."""
    calls = choice.tool_calls()
    if not calls:
        return AssistantMessage(choice.content)
    out = [ToolCallOut(call.id, FunctionCall(call.name, call.arguments)) for call in calls]
    return AssistantMessage(choice.content or None, tool_calls=out)


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
    data: ChatCompletionRequest, pipeline: Pipeline, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    include_usage = bool(data.stream and data.stream_options and data.stream_options.include_usage)
    return await serve_generation(
        pipeline,
        request,
        endpoint="chat.completions",
        id_prefix="chatcmpl",
        model=data.model,
        stream=data.stream,
        build=lambda: chat_generation(data, data.model, pipeline.settings.max_message_bytes),
        formatter=lambda request_id: ChatFormatter(request_id, data.model, include_usage, data.n, bool(data.logprobs)),
        session=data.user,
    )


@post("/v1/completions", status_code=200, responses=answers(Completion, 200, *GUARDED, *BODY, *ROUTED))
async def completions(
    data: CompletionRequest, pipeline: Pipeline, request: Request[Any, Any, Any]
) -> Response[bytes] | Stream:
    include_usage = bool(data.stream and data.stream_options and data.stream_options.include_usage)
    return await serve_generation(
        pipeline,
        request,
        endpoint="completions",
        id_prefix="cmpl",
        model=data.model,
        stream=data.stream,
        build=lambda: completion_generation(data, data.model, pipeline.settings.max_message_bytes),
        formatter=lambda request_id: CompletionFormatter(
            request_id,
            data.model,
            include_usage,
            data.n,
            logprobs=data.logprobs is not None and data.logprobs is not False,
            # Checked by the build step, which runs first; a prompt of token ids has no text to offset.
            prompt_chars=len(prompt_of(data.prompt, pipeline.settings.max_message_bytes)[0] or ""),
        ),
        session=data.user,
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
async def embeddings(data: EmbeddingRequest, pipeline: Pipeline, request: Request[Any, Any, Any]) -> Response[bytes]:
    _, result, headers = await serve_embedding(
        pipeline,
        request,
        endpoint="embeddings",
        id_prefix="emb",
        model=data.model,
        inputs=lambda: embedding_inputs(data, pipeline.settings.max_message_bytes),
    )
    data_items = [
        EmbeddingData(i, base64.b64encode(_float32(v)).decode() if data.encoding_format == "base64" else v)
        for i, v in enumerate(result.vectors)
    ]
    body = EmbeddingList(data_items, data.model, EmbeddingUsage(result.prompt_tokens, result.prompt_tokens))
    return Response(encoder.encode(body), media_type="application/json", headers=headers)


def _float32(vector: list[float]) -> bytes:
    return array.array("f", vector).tobytes()


async def all_cards(library: Library, principal: Principal) -> list[ModelCard]:
    """Embedded models, then each upstream's (cached by the router) in priority order; first name wins.

    Only the models ``principal``'s allowlist admits.
    """
    router = library.router
    loaded = set(library.manager.loaded())
    # Reading headers (and lineage manifests) touches every model file: not on the event loop.
    entries = await anyio.to_thread.run_sync(library.catalog.list)
    lineages = await anyio.to_thread.run_sync(lambda: [read_lineage(Path(entry.path)) for entry in entries])
    known = await library.db.call(model_records.every)
    embedded = (
        model_card(entry, entry.name in loaded, found, known.get(entry.name))
        for entry, found in zip(entries, lineages, strict=True)
    )
    cards = [card for card in embedded if router.admits(principal.constraints, card.provider, card.id)]
    seen = {card.id for card in cards}
    for state in router.ordered("any"):
        provider = state.provider
        if state.local_engine:
            continue
        for name in await router.models_of(state) or []:
            if name not in seen and router.admits(principal.constraints, provider.name, name):
                seen.add(name)
                cards.append(ModelCard(name, 0, provider.name, provider=provider.name, locality=provider.locality))
    return cards


#: Sent by Anthropic's clients on every request: they get Anthropic's model list shape.
ANTHROPIC_VERSION = "anthropic-version"


@get("/v1/models", responses=answers(ModelList, 200, *GUARDED, 502, 503))
async def list_models(library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    cards = await all_cards(library, principal_of(request))
    if ANTHROPIC_VERSION in request.headers:
        return Response(encoder.encode(anthropic_wire.model_page(cards)), media_type="application/json")
    return Response(encoder.encode(ModelList(cards)), media_type="application/json")


@get("/v1/models/{model_id:path}", responses=answers(ModelCard, 200, *GUARDED, 400, 404, 502, 503))
async def get_model(model_id: str, library: Library, request: Request[Any, Any, Any]) -> Response[bytes]:
    """One model by id, plain (``llama3.2:1b``) or with its provider (``ollama:llama3.2:1b``)."""
    model_id = model_id.lstrip("/")
    cards = await all_cards(library, principal_of(request))
    for card in cards:
        if model_id in (card.id, f"{card.provider}:{card.id}", f"{card.provider}/{card.id}"):
            found = anthropic_wire.model_info(card) if ANTHROPIC_VERSION in request.headers else card
            return Response(encoder.encode(found), media_type="application/json")
    validate_model_name(model_id.split("/", 1)[-1])
    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")


ROUTES = [chat_completions, completions, embeddings, list_models, get_model]
