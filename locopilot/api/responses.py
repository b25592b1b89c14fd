"""What each route answers, as the OpenAPI schema shows it.

Handlers return encoded bytes (msgspec, once), so Litestar cannot see the
types they send; each route names them here instead: its success type, and
the OpenAI-shaped :class:`~locopilot.errors.ErrorBody` for every error status
it can answer (Litestar would otherwise document its own validation error
shape, which clients never get). ``tests/security/test_schemathesis.py``
checks answers against this.
"""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from locopilot.errors import ErrorBody

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
    413: "The body is too large",
    429: "Over the key's quota",
    500: "A bug in locopilot",
    502: "An upstream provider failed",
    503: "The engine or every provider is unavailable, or too busy",
}


def answers(success: type | None, status: int = 200, *errors: int, error: type = ErrorBody) -> dict[int, ResponseSpec]:
    """The responses of a route that answers ``success`` (None: an empty body) with ``status``, and
    ``errors`` in the shape ``error`` (OpenAI's by default; the Ollama front's is ``OllamaErrorBody``)."""
    specs = {status: ResponseSpec(success, generate_examples=False, description="Success")}
    for code in sorted(set(errors)):
        specs[code] = ResponseSpec(error, generate_examples=False, description=_DESCRIPTIONS[code])
    return specs
