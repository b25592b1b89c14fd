"""The Ollama provider: Ollama's native API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``).

Sampling parameters go under ``options`` because Ollama ignores them at the
top level, and ``num_ctx`` is always sent so that a long prompt is not cut at
Ollama's default context size. A text completion is sent to ``/api/generate``
with ``raw`` set, so Ollama applies no template to the prompt.

Tools go to ``/api/chat`` in Ollama's form (:func:`chat_messages`, :func:`offered_tools`):
call arguments as objects, tool results with ``tool_name``, images as bare base64.
Ollama sends each call whole in one line; it becomes one ToolCallDelta with the
arguments as JSON text and an OpenAI-style id (made when Ollama sends none), and a
reply with calls finishes with ``tool_calls``.

httpx exceptions are translated by type in :func:`translate_transport_errors`:

    httpx.TimeoutException, httpx.TransportError,
    httpx.DecodingError, httpx.TooManyRedirects  → UpstreamError(retryable=True)

and HTTP answers by status in :func:`status_error`:

    429, 5xx                                     → UpstreamError(retryable=True, retry_after=…)
    404 with Ollama's ``{"error": …}`` body      → ModelNotFound
    other 4xx                                    → UpstreamError(retryable=False, upstream_status, upstream_body)
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec

from locopilot.errors import InvalidRequest, LocopilotError, ModelNotFound, UpstreamError
from locopilot.providers.base import (
    EmbeddingResult,
    Finish,
    GenerationRequest,
    Locality,
    Message,
    ModelDescription,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    WireLogprob,
)
from locopilot.providers.http import retry_after_seconds, transport_reason, upstream_transport

DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
"""Reads may wait minutes: a long prompt on a CPU is evaluated before the first token arrives."""


class _Function(msgspec.Struct):
    name: str
    arguments: dict[str, Any] = {}


class _ToolCall(msgspec.Struct):
    function: _Function
    id: str | None = None  # Ollama sends one since 0.12; older versions send none


class _Message(msgspec.Struct):
    content: str = ""
    thinking: str = ""
    tool_calls: list[_ToolCall] | None = None


class _StreamLine(msgspec.Struct):
    """One NDJSON line of ``/api/chat`` (``message``) or ``/api/generate`` (``response``)."""

    message: _Message | None = None
    response: str = ""
    thinking: str = ""  # /api/generate's
    logprobs: list[WireLogprob] | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0
    eval_count: int = 0
    load_duration: int = 0  # nanoseconds
    error: str | None = None


class _ErrorBody(msgspec.Struct):
    error: str


class _Tag(msgspec.Struct):
    name: str


class _Tags(msgspec.Struct):
    models: list[_Tag] = []


class _Embeddings(msgspec.Struct):
    embeddings: list[list[float]]
    prompt_eval_count: int = 0


class _Details(msgspec.Struct):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class _Show(msgspec.Struct):
    """What of ``/api/show``'s answer is read into a ModelDescription; :data:`SHOW_EXTRA` passes on."""

    details: _Details = msgspec.field(default_factory=_Details)
    model_info: dict[str, Any] | None = None
    template: str = ""
    parameters: str = ""
    capabilities: list[str] | None = None
    modified_at: str = ""


class _Loaded(msgspec.Struct):
    done_reason: str = ""


SHOW_EXTRA = ("license", "system", "messages", "projector_info", "tensors", "renderer", "parser", "requires")
"""Fields of an upstream's ``/api/show`` passed on as they are. Not its ``modelfile`` (its FROM
line is a path on the upstream's disk) nor ``remote_host``."""


_line_decoder = msgspec.json.Decoder(_StreamLine)
_error_decoder = msgspec.json.Decoder(_ErrorBody)
_tags_decoder = msgspec.json.Decoder(_Tags)
_embeddings_decoder = msgspec.json.Decoder(_Embeddings)
_show_decoder = msgspec.json.Decoder(_Show)
_loaded_decoder = msgspec.json.Decoder(_Loaded)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


@contextmanager
def translate_transport_errors(provider: str) -> Iterator[None]:
    """Turn httpx's failures to reach or read the upstream into retryable UpstreamErrors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamError(
            f"Ollama provider {provider} timed out ({type(exc).__name__})", retryable=True, reason=transport_reason(exc)
        ) from exc
    except (httpx.TransportError, httpx.DecodingError, httpx.TooManyRedirects) as exc:
        raise UpstreamError(
            f"Ollama provider {provider} could not be reached ({type(exc).__name__})",
            retryable=True,
            reason=transport_reason(exc),
        ) from exc


def status_error(provider: str, model: str, response: httpx.Response, body: bytes) -> LocopilotError:
    """The error for a non-2xx answer; ``body`` is the response's raw bytes."""
    status = response.status_code
    if status == 429 or status >= 500:
        return UpstreamError(
            f"Ollama provider {provider} answered {status}",
            retryable=True,
            upstream_status=status,
            upstream_body=body,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )
    try:
        said = _error_decoder.decode(body).error
    except msgspec.DecodeError:
        said = None
    if status == 404 and said is not None:
        # Ollama answers an unknown model with 404 and a JSON error; an unknown
        # route (a wrong base URL) is a plain-text 404 and stays an UpstreamError.
        return ModelNotFound(f"model {model!r} is not available from provider {provider}", param="model")
    if status == 400 and said is not None:
        # Ollama's word on the request itself (a model that cannot think, a bad format): the
        # client's to fix, with Ollama's own message (which may quote the request).
        return InvalidRequest(said, quotes_input=True)
    return UpstreamError(
        f"Ollama provider {provider} answered {status}",
        retryable=False,
        upstream_status=status,
        upstream_body=body,
    )


def options(request: GenerationRequest, num_ctx: int) -> dict[str, Any]:
    """Ollama's ``options`` for a request: sampling, length limits and context size."""
    sampling = request.sampling
    opts: dict[str, Any] = {
        "num_ctx": num_ctx,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
    }
    if sampling.seed is not None:
        opts["seed"] = sampling.seed
    if request.max_tokens is not None:
        opts["num_predict"] = request.max_tokens
    # An empty list would replace the stop words the model's Modelfile sets.
    if request.stop:
        opts["stop"] = list(request.stop)
    return opts


def token_logprobs(logprobs: list[WireLogprob] | None) -> tuple[TokenLogprob, ...]:
    """Ollama's ``logprobs`` of one line as the internal ones."""
    return tuple(each.internal() for each in logprobs or ())


def description(content: bytes) -> ModelDescription:
    """An ``/api/show`` answer as a ModelDescription (raises msgspec.DecodeError if it is none)."""
    shown = _show_decoder.decode(content)
    whole = _any_decoder.decode(content)
    details = shown.details
    return ModelDescription(
        family=details.family or None,
        families=tuple(details.families or ()),
        parameter_size=details.parameter_size or None,
        quantization_level=details.quantization_level or None,
        format=details.format or None,
        parent_model=details.parent_model or None,
        template=shown.template or None,
        parameters=shown.parameters or None,
        model_info=shown.model_info or {},
        capabilities=tuple(shown.capabilities or ()),
        modified_at=shown.modified_at or None,
        extra={key: whole[key] for key in SHOW_EXTRA if whole.get(key) not in (None, "", [], {})},
    )


def new_call_id() -> str:
    """An id for a call Ollama gave none, in the form Ollama and OpenAI use."""
    return "call_" + secrets.token_hex(12)


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as ``/api/chat`` takes them: call arguments as objects, images as bare base64,
    and each tool result with ``tool_name``, the name of the call it answers."""
    names: dict[str, str] = {}
    wire: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.images:
            item["images"] = [inline_image(image.url, index) for image in message.images]
        if message.tool_calls:
            calls = []
            for number, call in enumerate(message.tool_calls):
                names[call.id] = call.name
                try:
                    arguments = msgspec.json.decode(call.arguments) if call.arguments else {}
                except msgspec.DecodeError as exc:
                    raise InvalidRequest(
                        f"The arguments of tool call {call.id!r} are not JSON.",
                        param=f"messages[{index}].tool_calls[{number}].function.arguments",
                    ) from exc
                calls.append({"id": call.id, "function": {"name": call.name, "arguments": arguments}})
            item["tool_calls"] = calls
        if message.role == "tool":
            name = names.get(message.tool_call_id or "") or message.name
            if name:
                item["tool_name"] = name
            if message.tool_call_id:
                item["tool_call_id"] = message.tool_call_id
        wire.append(item)
    return wire


def inline_image(url: str, index: int) -> str:
    """The base64 data of a ``data:`` URL: Ollama takes images inline, never as links."""
    head, comma, data = url.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and comma):
        raise InvalidRequest("Ollama takes images as base64 data: URLs, not links.", param=f"messages[{index}].content")
    return data


def offered_tools(request: GenerationRequest) -> list[dict[str, Any]]:
    """The tools to send Ollama, which has no tool_choice: none for ``none``, only the named
    one for a named choice (Ollama cannot force a call; the model may still answer in text)."""
    choice = request.tool_choice
    if choice.mode == "none":
        return []
    tools = [tool for tool in request.tools if choice.mode != "function" or tool.name == choice.name]
    wire = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
        if tool.description is not None:
            function["description"] = tool.description
        wire.append({"type": "function", "function": function})
    return wire


class OllamaProvider:
    """One Ollama server. The provider owns its HTTP client and closes it in :meth:`aclose`."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        num_ctx: int,
        locality: Locality = "local",
        timeout: httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.locality: Locality = locality
        self.num_ctx = num_ctx
        self.client = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
            transport=transport or upstream_transport(),
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """The endpoint and JSON body for a generation request; raises InvalidRequest for what Ollama cannot do."""
        if request.sampling.logit_bias:
            raise InvalidRequest("logit_bias is not supported by Ollama", param="logit_bias")
        if request.grammar is not None:
            raise InvalidRequest("grammar is not supported by Ollama", param="grammar")
        if request.n > 1:
            raise InvalidRequest("Ollama gives one choice per request: n must be 1 there.", param="n")
        body: dict[str, Any] = {"model": request.model}
        if request.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
        if request.think is not None:
            body["think"] = request.think
        if request.keep_alive is not None:
            body["keep_alive"] = request.keep_alive  # seconds, negative: until unloaded (as Ollama reads a number)
        if request.messages is not None:
            path = "/api/chat"
            body["messages"] = chat_messages(request.messages)
            if tools := offered_tools(request):
                body["tools"] = tools
        elif request.prompt_tokens is not None:
            raise InvalidRequest("Ollama takes prompts as text, not token ids.", param="prompt")
        elif request.prompt is not None:
            path = "/api/generate"
            body["prompt"] = request.prompt
            body["raw"] = True
            if request.suffix is not None:
                body["suffix"] = request.suffix
        else:
            raise InvalidRequest("either prompt or messages is required")
        body["stream"] = True
        body["options"] = options(request, self.num_ctx)
        if request.json_schema is not None:
            try:
                body["format"] = msgspec.json.decode(request.json_schema)
            except msgspec.DecodeError as exc:
                raise InvalidRequest("response_format's schema is not valid JSON", param="response_format") from exc
        return path, body

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Stream one generation; closing the generator closes the response, which stops Ollama generating."""
        path, body = self._body(request)
        thinks = request.think not in (None, False)
        with translate_transport_errors(self.name):
            async with self.client.stream("POST", path, content=_encoder.encode(body)) as response:
                if response.status_code >= 300:
                    raise status_error(self.name, request.model, response, await response.aread())
                if request.echo and request.prompt is not None:
                    yield TextDelta(request.prompt, 0)
                calls = 0
                async for raw in response.aiter_lines():
                    if not raw.strip():
                        continue
                    try:
                        line = _line_decoder.decode(raw)
                    except msgspec.DecodeError as exc:
                        raise UpstreamError(
                            f"Ollama provider {self.name} sent a line that is not JSON", retryable=True
                        ) from exc
                    if line.error is not None:
                        raise UpstreamError(
                            f"Ollama provider {self.name} failed: {line.error}", retryable=False, quotes_input=True
                        )
                    message = line.message
                    text = message.content if message is not None else line.response
                    # Reasoning goes out only when it was asked for: a thinking model's own default
                    # (Ollama thinks unless told not to) reaches the OpenAI and Anthropic fronts as the answer alone.
                    thinking = (message.thinking if message is not None else line.thinking) if thinks else ""
                    logprobs = token_logprobs(line.logprobs) if request.logprobs is not None else ()
                    if text or thinking or logprobs:
                        yield TextDelta(text, 1 if text or thinking else 0, logprobs=logprobs, thinking=thinking)
                    # Ollama sends each call whole, its arguments as an object.
                    for call in line.message.tool_calls or () if line.message is not None else ():
                        yield ToolCallDelta(
                            call=calls,
                            id=call.id or new_call_id(),
                            name=call.function.name,
                            arguments=_encoder.encode(call.function.arguments).decode(),
                        )
                        calls += 1
                    if line.done:
                        # Ollama says "stop" after calls; OpenAI's clients look for "tool_calls".
                        reason = "length" if line.done_reason == "length" else "tool_calls" if calls else "stop"
                        yield Finish(
                            reason, line.prompt_eval_count, line.eval_count, load_seconds=line.load_duration / 1e9
                        )
                        return
        raise UpstreamError(f"Ollama provider {self.name} ended the stream before it was done", retryable=True)

    async def embed(self, model: str, inputs: list[str]) -> EmbeddingResult:
        with translate_transport_errors(self.name):
            response = await self.client.post("/api/embed", content=_encoder.encode({"model": model, "input": inputs}))
        if response.status_code >= 300:
            raise status_error(self.name, model, response, response.content)
        try:
            result = _embeddings_decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"Ollama provider {self.name} sent an unreadable embedding", retryable=True) from exc
        if len(result.embeddings) != len(inputs):
            raise UpstreamError(
                f"Ollama provider {self.name} returned {len(result.embeddings)} embeddings for {len(inputs)} inputs",
                retryable=True,
            )
        return EmbeddingResult(result.embeddings, result.prompt_eval_count)

    async def describe(self, model: str) -> ModelDescription:
        """The upstream's own ``/api/show`` of ``model`` (its name there)."""
        with translate_transport_errors(self.name):
            response = await self.client.post("/api/show", content=_encoder.encode({"model": model}))
        if response.status_code >= 300:
            raise status_error(self.name, model, response, response.content)
        try:
            return description(response.content)
        except msgspec.DecodeError as exc:
            raise UpstreamError(
                f"Ollama provider {self.name} sent an unreadable model description", retryable=True
            ) from exc

    async def keep_loaded(self, model: str, seconds: float | None, *, embedding: bool = False) -> str:
        """Ollama's request with nothing to generate: it loads ``model`` (keeping it ``seconds``)
        or, with 0, unloads it. An embedding model is asked through ``/api/embed``, which answers
        no reason: then the reason is the one asked for."""
        asked = "unload" if seconds == 0 else "load"
        body: dict[str, Any] = {"model": model, "input": []} if embedding else {"model": model, "stream": False}
        if seconds is not None:
            body["keep_alive"] = seconds
        path = "/api/embed" if embedding else "/api/generate"
        with translate_transport_errors(self.name):
            response = await self.client.post(path, content=_encoder.encode(body))
        if response.status_code >= 300:
            raise status_error(self.name, model, response, response.content)
        try:
            reason = _loaded_decoder.decode(response.content).done_reason
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"Ollama provider {self.name} sent an unreadable answer", retryable=True) from exc
        return reason or asked

    async def models(self) -> list[str]:
        with translate_transport_errors(self.name):
            response = await self.client.get("/api/tags")
        if response.status_code >= 300:
            raise status_error(self.name, "", response, response.content)
        try:
            tags = _tags_decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            raise UpstreamError(f"Ollama provider {self.name} sent an unreadable model list", retryable=True) from exc
        return [tag.name for tag in tags.models]
