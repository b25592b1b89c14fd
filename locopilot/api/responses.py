"""What each route answers, as the OpenAPI schema shows it.

Handlers return encoded bytes (msgspec, once), so Litestar cannot see the
types they send; each route names them here instead: its success type, and
the OpenAI-shaped :class:`~locopilot.errors.ErrorBody` for every error status
it can answer (Litestar would otherwise document its own validation error
shape, which clients never get). ``tests/security/test_schemathesis.py``
checks answers against this.
"""

from __future__ import annotations

import msgspec
from litestar import Response
from litestar.openapi.datastructures import ResponseSpec

from locopilot.errors import AnthropicErrorBody, ErrorBody, Front, OllamaErrorBody
from locopilot.schemas.openai import encoder

#: Every route but ``/health``: no key or a bad one, a missing scope or a foreign Host, a bug.
GUARDED = (401, 403, 500)
#: A route that reads a body: it may not parse, or be too large.
BODY = (400, 413)
#: A route that routes to a model: not found, over quota, an upstream or the engine failing.
ROUTED = (404, 429, 502, 503)

_DESCRIPTIONS = {
    400: "The request is invalid",
    401: "No API key, or one that does not work",
    403: "The key lacks the scope or the model, or the Host is not allowed",
    404: "No such model or key",
    409: "The model exists, or is in use",
    413: "The body is too large",
    429: "Over the key's quota",
    500: "A bug in locopilot",
    502: "An upstream provider failed",
    503: "The engine or every provider is unavailable, or too busy",
    507: "Not enough disk space for the download",
}


def answers(success: type | None, status: int = 200, *errors: int, front: Front = "openai") -> dict[int, ResponseSpec]:
    """The responses of a route that answers ``success`` (None: an empty body) with ``status``, and
    ``errors`` in ``front``'s error shape (Anthropic's answers 529 where the others answer 503; see
    :func:`locopilot.errors.render`)."""
    specs = {status: ResponseSpec(success, generate_examples=False, description="Success")}
    body: type = {"anthropic": AnthropicErrorBody, "ollama": OllamaErrorBody}.get(front, ErrorBody)
    for code in sorted(set(errors)):
        shown = 529 if front == "anthropic" and code == 503 else code
        specs[shown] = ResponseSpec(body, generate_examples=False, description=_DESCRIPTIONS[code])
    return specs


def json_response(body: msgspec.Struct, status_code: int = 200) -> Response[bytes]:
    """``body`` as a JSON answer."""
    return Response(encoder.encode(body), media_type="application/json", status_code=status_code)
