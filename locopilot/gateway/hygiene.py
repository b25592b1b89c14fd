"""Input and network hygiene that runs before authentication: the Host allowlist, CORS, body screening.

:class:`HostCheck` refuses (403, ``host_not_allowed``) a ``Host`` header that is not
``localhost``, ``127.0.0.1``, ``[::1]``, the bind address or a name in ``LOCOPILOT_ALLOWED_HOSTS``.
A page on ``evil.example`` whose name an attacker re-points at 127.0.0.1 (DNS rebinding) still
sends ``Host: evil.example``, so it never reaches a route. The check runs on a loopback bind
always, and on any other bind only when ``LOCOPILOT_ALLOWED_HOSTS`` is set: an exposed server
needs API keys anyway, and its operator is the one who knows the names clients use. A request
with no Host header (HTTP/1.0) is let through: browsers always send one. Names can be added to
the running server (:meth:`HostCheck.allow`, the admin route ``POST /v1/admin/hosts`` that
``locopilot expose`` calls with its tunnel's name) until it stops; they are never written anywhere.

:func:`cors_config` is None (no CORS headers at all) unless ``LOCOPILOT_CORS_ORIGINS`` names exact
origins; credentials are never allowed, so a wildcard could not leak a cookie-authenticated answer
either way, and the settings refuse ``*``.

:func:`screen_request` reads an inference request's body before it is decoded and refuses
(400) JSON nested deeper than :data:`MAX_JSON_DEPTH` (msgspec would recurse into it) and any
object key in :data:`REDIRECT_FIELDS`, at any depth: a request must not choose where it is sent
or with which upstream key. The subtrees under ``response_format`` and (on the Responses API)
``text`` are exempt (their keys are the caller's JSON-schema property names), and so are
``logit_bias``'s token ids; below the root, a tool's schema and a tool call's arguments are
screened for depth only (:data:`TOOL_DATA_FIELDS`): a tool may well take an ``api_key``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec
from litestar import Request
from litestar.config.cors import CORSConfig
from litestar.types import HTTPRequestEvent, Receive, ReceiveMessage, Scope

from locopilot.errors import Forbidden, InvalidRequest
from locopilot.settings import Settings

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
#: Keys that would pick an upstream, its key or its provider type in proxies that honour them (LiteLLM does).
REDIRECT_FIELDS = frozenset({"api_base", "base_url", "api_url", "api_key", "custom_llm_provider"})
#: Request bodies are shallow; JSON schemas in ``response_format`` are the deepest part.
MAX_JSON_DEPTH = 64
#: Routes whose bodies are screened.
SCREENED_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
    }
)
#: Top-level fields whose keys are data, not options.
DATA_FIELDS = frozenset({"response_format", "logit_bias", "text", "format"})
#: Below the root, fields whose keys are the caller's names (a tool's JSON schema, a tool call's
#: arguments in Anthropic's ``tool_use`` blocks and Ollama's calls): not screened for redirect
#: fields, still for depth.
TOOL_DATA_FIELDS = frozenset({"input_schema", "parameters", "input", "arguments"})
EXPOSED_HEADERS = ["X-Locopilot-Provider", "X-Locopilot-Model", "X-Request-Id", "Retry-After"]


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names to admit, or None when no Host check applies (see the module docstring)."""
    from locopilot.gateway.auth import is_loopback

    if not is_loopback(settings.host) and not settings.allowed_hosts.strip():
        return None
    names = set(LOOPBACK_NAMES) | settings.allowed_host_names
    try:
        address = ipaddress.ip_address(settings.host.strip("[]"))
    except ValueError:
        names.add(settings.host.lower())
    else:
        if not address.is_unspecified:
            names.add(f"[{address}]" if address.version == 6 else str(address))
    return frozenset(names)


def host_name(header: str) -> str:
    """``Host`` without its port, lower case, without a final dot: ``[::1]:8080`` → ``[::1]``."""
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end > 0 else host
    else:
        host = host.rpartition(":")[0] if ":" in host else host
    return host[:-1] if host.endswith(".") else host


class HostCheck:
    """Refuse requests whose Host header names this server by a name it does not answer to.

    ``allowed`` is what the settings name (None: no check); ``added`` holds the names
    :meth:`allow` added while the server runs. Both are read and changed on the event loop only.
    """

    def __init__(self, settings: Settings) -> None:
        self.allowed = allowed_hosts(settings)
        self.added: set[str] = set()

    @property
    def checked(self) -> bool:
        """Whether Host names are checked at all on this server."""
        return self.allowed is not None

    def allow(self, name: str) -> None:
        """Answer to ``name`` too, until :meth:`disallow` or the end of the process."""
        self.added.add(host_name(name))

    def disallow(self, name: str) -> bool:
        """Stop answering to a name :meth:`allow` added; False if it had not been added."""
        name = host_name(name)
        if name not in self.added:
            return False
        self.added.discard(name)
        return True

    def __call__(self, scope: Scope) -> None:
        """Raises Forbidden (``host_not_allowed``) for a Host this server does not answer to."""
        if self.allowed is None:
            return
        values = [value for name, value in scope["headers"] if name == b"host"]
        if len(values) > 1 or (values and not self.admits(host_name(values[0].decode("latin-1")))):
            raise Forbidden(
                "This server does not answer to that Host name; add it to LOCOPILOT_ALLOWED_HOSTS.",
                code="host_not_allowed",
            )

    def admits(self, name: str) -> bool:
        return self.allowed is None or name in self.allowed or name in self.added


def cors_config(settings: Settings) -> CORSConfig | None:
    origins = settings.cors_origin_list
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_credentials=False,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )


def screen(body: bytes) -> None:
    """Refuse a body nested too deeply or naming a redirect field (see the module docstring).

    The common body is cleared by byte counts alone; only one with many brackets, an escaped
    character or a redirect field's name in it is decoded here (and again by the handler).

    Raises:
        InvalidRequest: the body is nested deeper than :data:`MAX_JSON_DEPTH` or names a redirect field.
    """
    brackets = body.count(b"[") + body.count(b"{")
    named = b"\\u" in body or any(name.encode() in body for name in REDIRECT_FIELDS)
    if brackets <= MAX_JSON_DEPTH and not named:
        return
    try:
        value = msgspec.json.decode(body)
    except RecursionError:
        raise too_deep() from None
    except msgspec.DecodeError:
        return  # not JSON: the handler's decoder says so
    # (node, depth, at the root, inside a tool's schema or arguments)
    top: list[tuple[Any, int, bool, bool]] = [(value, 1, True, False)]
    while top:
        node, depth, is_root, is_data = top.pop()
        if depth > MAX_JSON_DEPTH:
            raise too_deep()
        if isinstance(node, dict):
            for key, child in node.items():
                if key in REDIRECT_FIELDS and not is_data:
                    raise InvalidRequest(
                        f"'{key}' may not be set in a request: upstreams are chosen by the server's configuration.",
                        param=key,
                        code="forbidden_field",
                    )
                if not (is_root and key in DATA_FIELDS):
                    top.append((child, depth + 1, False, is_data or (not is_root and key in TOOL_DATA_FIELDS)))
        elif isinstance(node, list):
            top.extend((child, depth + 1, False, is_data) for child in node)


def too_deep() -> InvalidRequest:
    return InvalidRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.", code="too_deep")


async def screen_request(scope: Scope, receive: Receive) -> None:
    """Screen an inference request's body (see :func:`screen`) before anything decodes it.

    The body is read through Litestar's Request, which keeps it for the handler and enforces
    ``LOCOPILOT_MAX_BODY_BYTES`` (413) while reading; :func:`until_length` saves it a receive.
    """
    if scope["method"] == "POST" and scope["path"] in SCREENED_PATHS:  # type: ignore[typeddict-item]
        body = await Request[Any, Any, Any](scope, until_length(scope, receive)).body()
        screen(body)


def until_length(scope: Scope, receive: Receive) -> Receive:
    """``receive``, where the message that completes a body of the announced ``Content-Length`` is its last.

    granian marks every piece of a body ``more_body: True`` and ends it with an empty message of its own,
    which costs a reader one more receive, a round trip through the server's threads, per request. The
    server has checked the length (a connection cannot carry more), so the last byte ends the body.
    """
    length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
    if length is None or not length.isdigit():
        return receive
    remaining = int(length)

    async def receive_body() -> ReceiveMessage:
        nonlocal remaining
        message = await receive()
        if message["type"] == "http.request" and message.get("more_body", False):
            remaining -= len(message["body"])
            if remaining <= 0:
                last: HTTPRequestEvent = {"type": "http.request", "body": message["body"], "more_body": False}
                return last
        return message

    return receive_body
