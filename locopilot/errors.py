"""The exception tree, and the one place that renders errors as OpenAI JSON.

    LocopilotError                  500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── ContextLengthExceeded   400 code=context_length_exceeded
    │   ├── TemplateFailed          400 code=chat_template_error (the model's chat template failed)
    │   └── InvalidModelName        400 code=invalid_model_name
    ├── AuthenticationError         401 code=invalid_api_key, WWW-Authenticate: Bearer
    ├── Forbidden                   403 invalid_request_error
    │   ├── PolicyForbidden         403 code=privacy_policy
    │   ├── MissingScope            403 code=insufficient_scope
    │   └── ModelNotAllowed         403 code=model_not_allowed
    ├── NotFound                    404 invalid_request_error
    │   └── ModelNotFound           404 code=model_not_found
    ├── MethodNotAllowed            405
    ├── Conflict                    409 code=conflict (a model in use, or one that exists)
    ├── PayloadTooLarge             413
    ├── RateLimited                 429 code=rate_limit_exceeded, Retry-After, x-ratelimit-*
    │   ├── RequestRateLimited      429 type=requests (the key's requests per minute)
    │   └── TokenRateLimited        429 type=tokens (the key's tokens per minute)
    ├── ClientDisconnected          499 (nginx's code; nobody is left to read it)
    ├── UpstreamError               502 (an upstream provider failed; ``retryable`` says if failover may help)
    │   └── ChecksumMismatch        502 code=checksum_mismatch (a download is not what its source published)
    └── Unavailable                 503 (optional Retry-After)
        ├── EngineUnavailable       503 code=engine_unavailable
        ├── QueueFull               503 code=queue_full, Retry-After
        ├── Overloaded              503 code=too_many_concurrent_requests, Retry-After
        ├── ShuttingDown            503 code=shutting_down (the shutdown grace is over)
        └── InsufficientMemory      503 code=insufficient_memory (a model does not fit in free memory)
    InsufficientStorage             507 code=insufficient_storage (a download does not fit on the disk)

Every error body is ``{"error": {"message", "type", "param", "code"}}`` on the OpenAI
routes; the Anthropic front (``/v1/messages``) answers in Anthropic's shape
(``{"type": "error", "error": {"type", "message"}}``, 529 for an overloaded engine) and
the Ollama front (``/api/*``) in Ollama's (``{"error": "..."}``): :func:`render`.

An error made of someone else's words (an upstream's message, a chat template's
exception) may quote the request, prompt included: it is marked ``quotes_input``,
and :meth:`LocopilotError.loggable` is what logs, health and the routing
record may show of it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


TransportReason = Literal["connect", "timeout", "connection"]
"""How an upstream was not reached or not heard out (see :class:`UpstreamError`)."""


class LocopilotError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        quotes_input: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after
        self.quotes_input = quotes_input or type(self).always_quotes_input

    always_quotes_input: ClassVar[bool] = False

    def loggable(self) -> str:
        """The message, or where it may quote the request (``quotes_input``) its code alone."""
        if not self.quotes_input:
            return self.message
        return f"{self.code or self.error_type} (message withheld: it may quote the request)"

    def body(self) -> ErrorBody:
        return ErrorBody(ErrorDetail(self.message, self.error_type, self.param, self.code))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(LocopilotError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class TemplateFailed(InvalidRequest):
    """The model's chat template raised or ran out of its budget; its words are the template's."""

    default_code = "chat_template_error"
    always_quotes_input = True


class InvalidModelName(InvalidRequest):
    default_code = "invalid_model_name"


class AuthenticationError(LocopilotError):
    """No API key, or one that is unknown, revoked or expired. The message never quotes the key."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": 'Bearer realm="locopilot"'}


class Forbidden(LocopilotError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "forbidden"


class PolicyForbidden(Forbidden):
    default_code = "privacy_policy"


class MissingScope(Forbidden):
    default_code = "insufficient_scope"


class ModelNotAllowed(Forbidden):
    default_code = "model_not_allowed"


class NotFound(LocopilotError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(LocopilotError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(LocopilotError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(LocopilotError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(LocopilotError):
    """A key is over one of its per-minute limits. The ``type`` says which, as OpenAI's does;
    ``limit_headers`` are the ``x-ratelimit-*`` headers at the time of the refusal."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, limit_headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.limit_headers}


class RequestRateLimited(RateLimited):
    error_type = "requests"


class TokenRateLimited(RateLimited):
    error_type = "tokens"


class ClientDisconnected(LocopilotError):
    status_code = 499
    error_type = "client_closed_request"


class UpstreamError(LocopilotError):
    """An upstream provider failed or refused.

    ``retryable`` is True for failures another provider might not have
    (connection refused, timeout, 5xx, 429); False for answers about the request
    itself. ``upstream_status`` and ``upstream_body`` keep the upstream's own
    answer so a 401/403 can reach the client unchanged. ``reason`` says, where the
    upstream was not reached or not heard out, how (set by the provider at its
    boundary, :func:`locopilot.providers.http.transport_reason`): a connection not
    made, a timeout, or a connection that failed later.
    """

    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        upstream_status: int | None = None,
        upstream_body: bytes | None = None,
        retry_after: int | None = None,
        quotes_input: bool = False,
        reason: TransportReason | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, quotes_input=quotes_input)
        self.retryable = retryable
        self.upstream_status = upstream_status
        self.upstream_body = upstream_body
        self.reason = reason


class Unavailable(LocopilotError):
    status_code = 503
    error_type = "server_error"
    default_code = "unavailable"


class EngineUnavailable(Unavailable):
    default_code = "engine_unavailable"


class QueueFull(Unavailable):
    default_code = "queue_full"


class Overloaded(Unavailable):
    """The server-wide cap on inference requests in flight is reached: not the client's fault, so 503."""

    default_code = "too_many_concurrent_requests"


class ShuttingDown(Unavailable):
    """The server is stopping and the time it gave requests in flight to finish is over."""

    default_code = "shutting_down"


class InsufficientMemory(Unavailable):
    """A model's estimated memory is more than the machine (or its cgroup) has free."""

    default_code = "insufficient_memory"


class InsufficientStorage(LocopilotError):
    """A download needs more disk space than the models folder's file system has free."""

    status_code = 507
    error_type = "server_error"
    default_code = "insufficient_storage"


class ChecksumMismatch(UpstreamError):
    """What was downloaded is not what its source published (sha256 or size); nothing was kept."""

    default_code = "checksum_mismatch"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def error_for_status(status: int, message: str) -> LocopilotError:
    """A LocopilotError for a framework-level HTTP status (routing, method, body size)."""
    match status:
        case 400 | 422:
            return InvalidRequest(message)
        case 404:
            return NotFound(message)
        case 405:
            return MethodNotAllowed(message)
        case 413:
            return PayloadTooLarge(message)
        case 503:
            return Unavailable(message)
        case _:
            return LocopilotError(message)


Front = Literal["openai", "anthropic", "ollama"]
"""The API a request came through, which decides the shape of its errors."""


def front_of(path: str) -> Front:
    """The API whose error shape answers a request for ``path``."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path == "/api" or path.startswith("/api/"):
        return "ollama"
    return "openai"


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicErrorBody(msgspec.Struct):
    error: AnthropicErrorDetail
    type: str = "error"


class OllamaErrorBody(msgspec.Struct):
    error: str


_encoder = msgspec.json.Encoder()


def render(exc: LocopilotError, front: Front) -> tuple[int, bytes]:
    """The status and JSON body of ``exc`` in ``front``'s shape (headers: ``exc.headers()``)."""
    match front:
        case "anthropic":
            # Anthropic says 529 overloaded_error where the service cannot take the request now.
            status = 529 if isinstance(exc, Unavailable) else exc.status_code
            kind = ANTHROPIC_TYPES.get(status, "api_error")
            # Anthropic's shape has no param: its own messages start with the field's path.
            message = exc.message if not exc.param or exc.param in exc.message else f"{exc.param}: {exc.message}"
            return status, _encoder.encode(AnthropicErrorBody(AnthropicErrorDetail(kind, message)))
        case "ollama":
            return exc.status_code, _encoder.encode(OllamaErrorBody(exc.message))
        case _:
            return exc.status_code, _encoder.encode(exc.body())
