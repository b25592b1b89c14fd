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
    StreamEvent,
    TextDelta,
    ToolCallDelta,
)
from locopilot.providers.http import upstream_transport

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
    tool_calls: list[_ToolCall] | None = None


class _StreamLine(msgspec.Struct):
    """One NDJSON line of ``/api/chat`` (``message``) or ``/api/generate`` (``response``)."""

    message: _Message | None = None
    response: str = ""
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


_line_decoder = msgspec.json.Decoder(_StreamLine)
_error_decoder = msgspec.json.Decoder(_ErrorBody)
_tags_decoder = msgspec.json.Decoder(_Tags)
_embeddings_decoder = msgspec.json.Decoder(_Embeddings)
_encoder = msgspec.json.Encoder()


@contextmanager
def translate_transport_errors(provider: str) -> Iterator[None]:
    """Turn httpx's failures to reach or read the upstream into retryable UpstreamErrors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamError(f"Ollama provider {provider} timed out ({type(exc).__name__})", retryable=True) from exc
    except (httpx.TransportError, httpx.DecodingError, httpx.TooManyRedirects) as exc:
        raise UpstreamError(
            f"Ollama provider {provider} could not be reached ({type(exc).__name__})", retryable=True
        ) from exc


def retry_after_seconds(value: str | None) -> int | None:
    """``Retry-After`` in whole seconds; the HTTP-date form is not used by Ollama and reads as None."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


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
    if status == 404:
        # Ollama answers an unknown model with 404 and a JSON error; an unknown
        # route (a wrong base URL) is a plain-text 404 and stays an UpstreamError.
        try:
            _error_decoder.decode(body)
        except msgspec.DecodeError:
            pass
        else:
            return ModelNotFound(f"model {model!r} is not available from provider {provider}", param="model")
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
        if request.logprobs is not None:
            raise InvalidRequest("logprobs are not supported by Ollama.", param="logprobs")
        body: dict[str, Any] = {"model": request.model}
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
                    text = line.message.content if line.message is not None else line.response
                    if text:
                        yield TextDelta(text, 1)
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
