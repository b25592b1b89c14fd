"""The Ollama provider: Ollama's native API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``).

Sampling parameters go under ``options`` because Ollama ignores them at the
top level, and ``num_ctx`` is always sent so that a long prompt is not cut at
Ollama's default context size. A text completion is sent to ``/api/generate``
with ``raw`` set, so Ollama applies no template to the prompt.

httpx exceptions are translated by type in :func:`translate_transport_errors`:

    httpx.TimeoutException, httpx.TransportError,
    httpx.DecodingError, httpx.TooManyRedirects  → UpstreamError(retryable=True)

and HTTP answers by status in :func:`status_error`:

    429, 5xx                                     → UpstreamError(retryable=True, retry_after=…)
    404 with Ollama's ``{"error": …}`` body      → ModelNotFound
    other 4xx                                    → UpstreamError(retryable=False, upstream_status, upstream_body)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec

from locopilot.errors import InvalidRequest, LocopilotError, ModelNotFound, UpstreamError
from locopilot.providers.base import EmbeddingResult, Finish, GenerationRequest, Locality, StreamEvent, TextDelta
from locopilot.providers.http import upstream_transport

DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
"""Reads may wait minutes: a long prompt on a CPU is evaluated before the first token arrives."""


class _Message(msgspec.Struct):
    content: str = ""


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
        body: dict[str, Any] = {"model": request.model}
        if request.messages is not None:
            path = "/api/chat"
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        elif request.prompt is not None:
            path = "/api/generate"
            body["prompt"] = request.prompt
            body["raw"] = True
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
                    if line.done:
                        reason = "length" if line.done_reason == "length" else "stop"
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
