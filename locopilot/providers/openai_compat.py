"""The openai provider: any OpenAI-compatible server (llama-server, vLLM, LM Studio, a cloud, another locopilot).

Generation always streams upstream (``"stream": true`` with usage requested),
also when the client waits for the whole reply: the upstream timeout then bounds
the wait for each chunk, not for the whole answer, so a long generation on a
slow upstream is not cut off. Text is forwarded as each network read brings it.
A server that sends no usage in streams (llama_cpp.server) leaves the prompt
uncounted. Requests go out in OpenAI's wire form, tools, tool calls and results,
image parts, token prompts, ``n``, logprobs and ``suffix`` included; streamed
``delta.tool_calls`` come back as ToolCallDelta events, and every choice's text
(with its logprobs) as TextDelta events of its ``index``. Errors:

    before the first event
      connect error, timeout, broken connection   UpstreamError(retryable=True)
      HTTP 429 or 5xx                             UpstreamError(retryable=True, retry_after from Retry-After)
      HTTP 404 with code model_not_found          ModelNotFound
      HTTP 400 that says the context is exceeded  ContextLengthExceeded
      any other non-2xx answer                    UpstreamError(retryable=False), with the upstream's
                                                  status and raw body for passthrough (a 401/403 upsell)
      a malformed event                           UpstreamError(retryable=True)
    after it
      any of the above, an error event, or a      UpstreamError(retryable=False): the client has output
      stream that ends before it finished         already, so nothing may fail over

An error event (``data: {"error": ...}``, or llama-server's own ``error:``
field) is UpstreamError(retryable=False) wherever it comes, or
ContextLengthExceeded when it says so. httpx exceptions are translated by
type. The API key is only ever in the client's headers, which httpx prints as
``[secure]``; it is in no message, repr or log line of this module.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from locopilot import __version__
from locopilot.engine.protocol import SamplingParams
from locopilot.errors import ContextLengthExceeded, InvalidRequest, LocopilotError, ModelNotFound, UpstreamError
from locopilot.providers.base import (
    EmbeddingResult,
    Finish,
    FunctionTool,
    GenerationRequest,
    Locality,
    Message,
    ModelDescription,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    WireLogprob,
    human_count,
    refuse_thinking,
)
from locopilot.providers.http import Streamed, retry_after_seconds, streaming_post, transport_reason, upstream_transport
from locopilot.sse import EventParser

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=30.0)
"""``read`` bounds the wait for each chunk, so it must outlast a slow upstream's prompt processing."""

MAX_ERROR_BODY = 1 << 20
"""Bytes of an upstream error body kept for passthrough; the rest is dropped."""

# Failures of the path to the upstream rather than answers about the request.
_TRANSIENT: tuple[type[httpx.HTTPError], ...] = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

# The upstream's own ways of saying a prompt does not fit: OpenAI's code, llama-server's type.
_CONTEXT_EXCEEDED = frozenset({"context_length_exceeded", "exceed_context_size_error"})
# vLLM gives no code (its ``code`` is the status, 400) but always these words, in every release's
# message for a prompt or max_tokens over ``max_model_len`` (tests/test_vllm_contract.py).
_CONTEXT_EXCEEDED_WORDS = "maximum context length is"


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    """``{"error": {...}}`` from OpenAI and llama-server, or vLLM's flat ``{"message", "type", "code"}``."""

    error: _ErrorDetail | str | None = None
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Logprobs(msgspec.Struct):
    """A chat choice's ``content`` list, or a text completion's parallel lists."""

    content: list[WireLogprob] | None = None
    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None
    stop_reason: str | int | None = None  # vLLM's (and locopilot's): the stop string (or token id) that matched


class _PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # OpenAI, vLLM and locopilot say how much of the prompt came from their cache; others send nothing or null.
    prompt_tokens_details: _PromptTokensDetails | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _ErrorDetail | str | None = None
    # vLLM before 0.10 sent its mid-stream errors flat: {"object": "error", "message": ..., "code": 500}.
    object: str | None = None
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _Embedding(msgspec.Struct):
    embedding: list[float]
    index: int | None = None


class _Embeddings(msgspec.Struct):
    data: list[_Embedding]
    usage: _Usage | None = None


class _Model(msgspec.Struct):
    id: str


class _Models(msgspec.Struct):
    data: list[_Model]


_encoder = msgspec.json.Encoder()
_chunk_decoder = msgspec.json.Decoder(_Chunk)
_error_body_decoder = msgspec.json.Decoder(_ErrorBody)
_error_detail_decoder = msgspec.json.Decoder(_ErrorDetail)
_embeddings_decoder = msgspec.json.Decoder(_Embeddings)
_models_decoder = msgspec.json.Decoder(_Models)
_any_decoder = msgspec.json.Decoder()


_JSON = {"Content-Type": "application/json"}
_GENERATION_PATHS = ("/chat/completions", "/completions")
_SSE = {"Content-Type": "application/json", "Accept": "text/event-stream"}


class OpenAICompatProvider:
    """One OpenAI-compatible upstream at ``base_url`` (the URL that ends in ``/v1``).

    Owns one ``httpx.AsyncClient`` that never retries (the router decides what
    to try next); ``aclose`` closes it. ``timeout`` defaults to
    :data:`DEFAULT_TIMEOUT`; ``transport`` defaults to
    :func:`~locopilot.providers.http.upstream_transport`'s.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        api_key: str | None = None,
        locality: Locality = "remote",
        timeout: httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream {name!r} needs an http:// or https:// URL")
        self.name = name
        self.locality: Locality = locality
        self._display_url = str(url.copy_with(username=None, password=None, query=None, fragment=None))
        headers = {"User-Agent": f"locopilot/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._transport = transport or upstream_transport()
        self._client = httpx.AsyncClient(
            base_url=url,
            headers=headers,
            timeout=timeout or DEFAULT_TIMEOUT,
            transport=self._transport,
            # Proxies and CA bundles come from Settings, never from the environment behind its back.
            trust_env=False,
        )
        # The generation requests, prepared once by the client itself (URL joined to the base,
        # headers merged with its defaults, timeout) and sent past it: see streaming_post.
        self._posters = {
            path: streaming_post(self._transport, self._client.build_request("POST", path, headers=_SSE))
            for path in _GENERATION_PATHS
        }

    def __repr__(self) -> str:
        return f"OpenAICompatProvider(name={self.name!r}, base_url={self._display_url!r}, locality={self.locality!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream one generation; closing the generator closes the upstream response."""
        path, body, param = generation_body(request)
        reader = _ChunkReader(self.name, chat=request.messages is not None, param=param)
        try:
            async with self._posters[path](_encoder.encode(body)) as response:
                if not 200 <= response.status_code < 300:
                    content = await _read_capped(response)
                    raise self._status_error(response.status_code, response.headers, content, param)
                events = EventParser()
                # Whatever one network read brings goes out as one delta per choice: no waiting
                # for more, and no hop per event when a fast upstream sends many at once.
                async for data in response.aiter_bytes():
                    read: list[TextDelta | ToolCallDelta] = []
                    failure: LocopilotError | None = None
                    try:
                        for event in events.feed(data):
                            # After [DONE], read on to the end of the body: httpx reuses
                            # a connection only once its response was read to the end.
                            if not reader.done:
                                reader.read(*event, read)
                    except LocopilotError as exc:
                        failure = exc
                    for delta in read:  # what came before a failing event still reaches the client
                        yield delta
                    if failure is not None:
                        raise failure
        except httpx.HTTPError as exc:
            # A connection lost after the upstream said why it stopped lost nothing but the usage.
            if reader.finish_reason is None:
                raise self._transport_error(exc, started=reader.deltas > 0) from exc
        if not reader.done and reader.finish_reason is None:
            raise UpstreamError(
                f"upstream {self.name!r} ended the stream before it finished", retryable=reader.deltas == 0
            )
        yield reader.finish()

    async def embed(self, model: str, inputs: list[str]) -> EmbeddingResult:
        content = await self._call("POST", "/embeddings", {"model": model, "input": inputs, "encoding_format": "float"})
        try:
            answer = _embeddings_decoder.decode(content)
        except msgspec.DecodeError as exc:
            raise self._malformed("embeddings") from exc
        if len(answer.data) != len(inputs):
            raise UpstreamError(
                f"upstream {self.name!r} returned {len(answer.data)} embeddings for {len(inputs)} inputs",
                retryable=True,
            )
        ordered = sorted(enumerate(answer.data), key=lambda pair: pair[0] if pair[1].index is None else pair[1].index)
        tokens = answer.usage.prompt_tokens if answer.usage else 0
        return EmbeddingResult([item.embedding for _, item in ordered], tokens)

    async def models(self) -> list[str]:
        content = await self._call("GET", "/models", None)
        try:
            return [model.id for model in _models_decoder.decode(content).data]
        except msgspec.DecodeError as exc:
            raise self._malformed("model list") from exc

    async def describe(self, model: str) -> ModelDescription:
        """What the upstream's ``/v1/models`` entry for ``model`` says (see :func:`described`);
        ModelNotFound when the list has no such entry."""
        content = await self._call("GET", "/models", None)
        try:
            listed = _any_decoder.decode(content)
        except msgspec.DecodeError as exc:
            raise self._malformed("model list") from exc
        entries = listed.get("data") if isinstance(listed, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("id") == model:
                return described(entry)
        raise ModelNotFound(f"model {model!r} is not available from provider {self.name}", param="model")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> bytes:
        """The body of a 2xx answer to a non-streaming request; anything else raises."""
        try:
            if body is None:
                response = await self._client.request(method, path)
            else:
                response = await self._client.request(method, path, content=_encoder.encode(body), headers=_JSON)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, started=False) from exc
        if not response.is_success:
            raise self._status_error(response.status_code, response.headers, response.content, "input")
        return response.content

    def _transport_error(self, exc: httpx.HTTPError, *, started: bool) -> UpstreamError:
        detail = str(exc) or "no detail"
        return UpstreamError(
            f"upstream {self.name!r} failed: {type(exc).__name__} ({detail})",
            retryable=isinstance(exc, _TRANSIENT) and not started,
            reason=transport_reason(exc),
        )

    def _malformed(self, what: str) -> UpstreamError:
        return UpstreamError(f"upstream {self.name!r} sent a malformed {what}", retryable=True)

    def _status_error(self, status: int, headers: Mapping[str, str], content: bytes, param: str) -> LocopilotError:
        detail = error_detail(content)
        said = detail.message if detail and detail.message else None
        message = f"upstream {self.name!r} answered HTTP {status}" + (f": {said}" if said else "")
        quotes = said is not None  # an upstream's words may quote the request (pydantic's errors do)
        if status == 429 or status >= 500:
            return UpstreamError(
                message,
                retryable=True,
                upstream_status=status,
                upstream_body=content,
                retry_after=retry_after_seconds(headers.get("Retry-After")),
                quotes_input=quotes,
            )
        if detail is not None:
            if status == 404 and detail.code == "model_not_found":
                return ModelNotFound(said or message, param="model", quotes_input=quotes)
            if status == 400 and (
                _CONTEXT_EXCEEDED & {detail.code, detail.type} or _CONTEXT_EXCEEDED_WORDS in (said or "")
            ):
                return ContextLengthExceeded(said or message, param=param, quotes_input=quotes)
        return UpstreamError(
            message, retryable=False, upstream_status=status, upstream_body=content, quotes_input=quotes
        )


def generation_body(request: GenerationRequest) -> tuple[str, dict[str, Any], str]:
    """The path, JSON body and input field name of the upstream request for ``request``, in OpenAI's wire form."""
    refuse_thinking(request)  # OpenAI's wire has no such field to pass it on in
    sampling = request.sampling
    body: dict[str, Any] = {"model": request.model}
    if request.messages is not None:
        path, param = "/chat/completions", "messages"
        body["messages"] = [wire_message(m) for m in request.messages]
        if request.tools:
            body["tools"] = [wire_tool(tool) for tool in request.tools]
            choice = request.tool_choice
            if choice.mode == "function":
                body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                body["tool_choice"] = choice.mode
            if not request.parallel_tool_calls:  # OpenAI's default is true; some servers know no such field
                body["parallel_tool_calls"] = False
        if request.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
    elif request.prompt is not None or request.prompt_tokens is not None:
        path, param = "/completions", "prompt"
        body["prompt"] = request.prompt if request.prompt is not None else request.prompt_tokens
        if request.echo:
            body["echo"] = True
        if request.suffix is not None:
            body["suffix"] = request.suffix
        if request.logprobs is not None:
            body["logprobs"] = request.logprobs
    else:
        raise InvalidRequest("a generation needs a prompt or messages")
    if request.n != 1:
        body["n"] = request.n
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = request.stop
    body["temperature"] = sampling.temperature
    body["top_p"] = sampling.top_p
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    body["presence_penalty"] = sampling.presence_penalty
    body["frequency_penalty"] = sampling.frequency_penalty
    if sampling.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
    # llama.cpp and vLLM extensions, sent only when they differ from the defaults
    # (which are llama-server's): OpenAI's own API refuses fields it does not know.
    defaults = SamplingParams()
    for extra in ("top_k", "min_p", "repeat_penalty"):
        if getattr(sampling, extra) != getattr(defaults, extra):
            body[extra] = getattr(sampling, extra)
    if request.grammar is not None:
        body["grammar"] = request.grammar
    if request.json_schema is not None:
        body["response_format"] = response_format(request.json_schema)
    return path, body, param


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def described(entry: dict[str, Any]) -> ModelDescription:
    """What one ``/v1/models`` entry says of its model, and nothing more. Read: locopilot's own
    fields (``architecture``, ``parameter_count``, ``quantization``, ``context_length``, ``tools``;
    its ``chat_template`` names a template and holds none, so no template is given), vLLM's
    ``max_model_len`` and llama-server's ``meta`` (``n_params``, ``n_ctx_train``). A context
    length is given under ``<architecture>.context_length`` only when the architecture is known,
    as Ollama's keys go; ``tools`` only when locopilot says how it calls them. Every model listed
    takes completions, so ``completion`` is always there."""
    found = entry.get("meta")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    family = _text(entry.get("architecture"))
    parameters = _count(entry.get("parameter_count")) or _count(meta.get("n_params"))
    context = (
        _count(entry.get("context_length")) or _count(entry.get("max_model_len")) or _count(meta.get("n_ctx_train"))
    )
    info: dict[str, Any] = {}
    if family:
        info["general.architecture"] = family
        if context:
            info[f"{family}.context_length"] = context
    if parameters:
        info["general.parameter_count"] = parameters
    created = _count(entry.get("created"))
    return ModelDescription(
        family=family,
        families=(family,) if family else (),
        parameter_size=human_count(parameters),
        quantization_level=_text(entry.get("quantization")),
        model_info=info,
        capabilities=("completion", "tools") if _text(entry.get("tools")) else ("completion",),
        modified_at=datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z") if created else None,
    )


def wire_message(message: Message) -> dict[str, Any]:
    """One message as OpenAI's chat API takes it."""
    content: str | list[dict[str, Any]] | None = message.content
    if message.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
        for image in message.images:
            url: dict[str, Any] = {"url": image.url}
            if image.detail is not None:
                url["detail"] = image.detail
            parts.append({"type": "image_url", "image_url": url})
        content = parts
    elif message.tool_calls and not message.content:
        content = None  # OpenAI's form of an assistant turn that is only calls
    wire: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        wire["name"] = message.name
    return wire


def wire_tool(tool: FunctionTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def response_format(json_schema: str) -> dict[str, Any]:
    try:
        schema = _any_decoder.decode(json_schema)
    except msgspec.DecodeError as exc:
        raise InvalidRequest("json_schema is not valid JSON", param="response_format") from exc
    if schema == {"type": "object"}:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}


def error_detail(content: bytes) -> _ErrorDetail | None:
    """The error an upstream described in its body, if the body is one of the usual JSON shapes."""
    try:
        body = _error_body_decoder.decode(content)
    except msgspec.DecodeError:
        return None
    match body.error:
        case _ErrorDetail():
            return body.error
        case str(message):
            return _ErrorDetail(message=message)
        case None if body.message is not None:
            return _ErrorDetail(message=body.message, type=body.type, code=body.code)
    return None


async def _read_capped(response: Streamed) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        parts.append(part)
        size += len(part)
        if size >= MAX_ERROR_BODY:
            break
    return b"".join(parts)[:MAX_ERROR_BODY]


class _ChunkReader:
    """The state of one stream: what has been said, why each choice stopped, what it cost."""

    def __init__(self, name: str, *, chat: bool, param: str) -> None:
        self.name = name
        self.chat = chat
        self.param = param
        self.done = False
        self.deltas = 0
        self.reasons: dict[int, str] = {}
        self.calls: dict[int, int] = {}  # choice -> calls seen, for upstreams that number none
        self.stop: str | None = None
        self.usage: _Usage | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.reasons.get(0)

    def read(self, field: str, data: str, out: list[TextDelta | ToolCallDelta]) -> None:
        """Append the events of one SSE event to ``out``, text of one choice joined to the text
        before it; raises for an error event or a malformed one."""
        if field == "error":
            raise self._error_event(_decode_error_detail(data))
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = _chunk_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                f"upstream {self.name!r} sent a malformed stream event", retryable=self.deltas == 0
            ) from exc
        match chunk.error:
            case _ErrorDetail():
                raise self._error_event(chunk.error)
            case str(message):
                raise self._error_event(_ErrorDetail(message=message))
        if chunk.object == "error":
            raise self._error_event(_ErrorDetail(message=chunk.message, type=chunk.type, code=chunk.code))
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            if choice.finish_reason:
                self.reasons[choice.index] = choice.finish_reason
            if choice.index == 0 and isinstance(choice.stop_reason, str):
                self.stop = choice.stop_reason
            delta = choice.delta
            text = (delta.content if delta else None) if self.chat else choice.text
            if text:
                self.deltas += 1
                logprobs = _token_logprobs(choice.logprobs) if choice.logprobs is not None else ()
                last = out[-1] if out else None
                if isinstance(last, TextDelta) and last.index == choice.index:
                    out[-1] = TextDelta(last.text + text, last.tokens + 1, choice.index, last.logprobs + logprobs)
                else:
                    out.append(TextDelta(text, 1, choice.index, logprobs))
            if delta is not None and delta.tool_calls:
                for call in delta.tool_calls:
                    self.deltas += 1
                    out.append(self._call_delta(choice.index, call))

    def _call_delta(self, index: int, call: _ToolCallDelta) -> ToolCallDelta:
        function = call.function or _FunctionDelta()
        seen = self.calls.get(index, 0)
        # Without an index, a piece with an id starts the next call and one without continues the last.
        number = call.index if call.index is not None else seen if call.id is not None else max(seen - 1, 0)
        self.calls[index] = max(seen, number + 1)
        return ToolCallDelta(
            call=number, index=index, id=call.id, name=function.name, arguments=function.arguments or ""
        )

    def finish(self) -> Finish:
        reason = self.finish_reason or "stop"
        choices = max(self.reasons, default=0) + 1
        reasons = tuple(self.reasons.get(i, "stop") for i in range(choices)) if choices > 1 else ()
        if self.usage is None:
            return Finish(reason, 0, self.deltas, reasons=reasons, stop=self.stop)
        details = self.usage.prompt_tokens_details
        cached = details.cached_tokens or 0 if details is not None else 0
        return Finish(reason, self.usage.prompt_tokens, self.usage.completion_tokens, cached, reasons, stop=self.stop)

    def _error_event(self, detail: _ErrorDetail) -> LocopilotError:
        said = detail.message or "no message"
        if _CONTEXT_EXCEEDED & {detail.code, detail.type}:
            return ContextLengthExceeded(said, param=self.param, quotes_input=True)
        message = f"upstream {self.name!r} reported an error mid-stream: {said}"
        return UpstreamError(message, retryable=False, quotes_input=True)


def _token_logprobs(logprobs: _Logprobs) -> tuple[TokenLogprob, ...]:
    """A chunk's logprobs in the internal form, from a chat choice's or a text completion's."""
    if logprobs.content is not None:
        return tuple(item.internal() for item in logprobs.content)
    tokens = logprobs.tokens or []
    values = logprobs.token_logprobs or []
    tops = logprobs.top_logprobs or []
    return tuple(
        TokenLogprob(
            token=token,
            logprob=(values[i] if i < len(values) else None) or 0.0,
            top=tuple(TopLogprob(token=t, logprob=lp) for t, lp in ((tops[i] or {}).items() if i < len(tops) else ())),
        )
        for i, token in enumerate(tokens)
    )


def _decode_error_detail(data: str) -> _ErrorDetail:
    try:
        return _error_detail_decoder.decode(data)
    except msgspec.DecodeError:
        return _ErrorDetail(message=data)
