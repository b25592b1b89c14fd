"""The HTTP transport under every upstream client.

httpx is the client API everywhere; underneath it runs either aiohttp (through
httpx-aiohttp) or httpx's own httpcore transport. Measured with
bench/gateway.py: httpcore costs about twice aiohttp's CPU per request and its
throughput falls as concurrency rises, so aiohttp is the default.

Both never retry (the router decides what to try next) and never cap the
number of connections: the upstream queues work itself, and a cap here would
turn load into pool timeouts that look like outages.

A streamed generation request, the hot path, goes through :func:`streaming_post`:
over aiohttp it skips httpx's Request and Response objects (their header
normalisation, body encoding and content decoders were about 400 Python calls of
the 2,200 a proxied request made, bench/gateway.py); aiohttp's exceptions are
still translated to httpx's, by httpx-aiohttp's own map, so callers catch one
family either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from locopilot.errors import TransportReason
from locopilot.settings import UpstreamTransport

if TYPE_CHECKING:
    import aiohttp


def upstream_transport(kind: UpstreamTransport = "aiohttp") -> httpx.AsyncBaseTransport:
    if kind == "httpx":
        return httpx.AsyncHTTPTransport(retries=0, limits=httpx.Limits(max_connections=None))
    return aiohttp_transport()


def aiohttp_transport() -> httpx.AsyncBaseTransport:
    """httpx-aiohttp's transport, with :func:`streaming_post`'s direct path."""
    # Imported here, when an upstream is configured: aiohttp is a third of the server's
    # imports (about 0.1 s of CPU at every start), and a server without upstreams needs none of it.
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    class AiohttpUpstream(AiohttpTransport):
        def session(self) -> aiohttp.ClientSession:
            if not isinstance(self.client, aiohttp.ClientSession):
                self.client = self.get_client()
            return self.client

        def poster(self, template: httpx.Request) -> Poster:
            return _AiohttpPost(self.session, template)

    # The session is made on first use: aiohttp wants a running event loop for it.
    # limit=0 is aiohttp's "no cap" (httpx-aiohttp would otherwise leave aiohttp's 100).
    # trust_env=False: proxies come from settings, never from the environment behind its back.
    return AiohttpUpstream(
        client=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False),
    )


class Streamed(Protocol):
    """What a streamed answer offers its reader: an ``httpx.Response``, or aiohttp's through a thin wrapper."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...


Poster = Callable[[bytes], AbstractAsyncContextManager[Streamed]]
"""``async with post(content) as response``: one POST of ``content``; the response is closed on exit."""


def streaming_post(transport: httpx.AsyncBaseTransport, template: httpx.Request) -> Poster:
    """POSTs to ``template``'s URL with its headers and timeout (a request the client built once).

    Raises (from the poster and the response's ``aiter_bytes``) httpx's exceptions only.
    """
    poster = getattr(transport, "poster", None)
    if poster is not None:
        made: Poster = poster(template)
        return made
    return _HttpxPost(transport, template)


class _HttpxPost:
    """Any httpx transport: a copy of the template straight to ``handle_async_request``.

    What ``AsyncClient.stream`` does, less what an upstream client never uses: the
    request is a copy of one the client built at start (so the URL, the merged headers and
    the timeout are the client's own). Skipped: URL and header merging, the cookie jar (an
    upstream's cookies are never sent back), auth and redirect flows (none are configured)
    and httpx's INFO line per request (the access log has one). It leans on httpx's
    internals: see :mod:`locopilot.dependency_internals`.
    """

    __slots__ = ("extensions", "headers", "transport", "url")

    def __init__(self, transport: httpx.AsyncBaseTransport, template: httpx.Request) -> None:
        self.transport = transport
        self.url = template.url
        # httpx.Request adds each body's own Content-Length; the template's (0) would win over it.
        self.headers = [(k, v) for k, v in template.headers.raw if k.lower() != b"content-length"]
        self.extensions = template.extensions

    @asynccontextmanager
    async def __call__(self, content: bytes) -> AsyncIterator[Streamed]:
        request = httpx.Request("POST", self.url, headers=self.headers, content=content, extensions=self.extensions)
        response = await self.transport.handle_async_request(request)
        try:
            yield response
        finally:
            await response.aclose()


class _AiohttpPost:
    """aiohttp's session, called directly with what httpx-aiohttp would pass it.

    The same timeouts (httpx's connect, read and pool as aiohttp's sock_connect, sock_read
    and connect) and no redirects. Content decoding is aiohttp's, for the encodings it asks for
    itself: the template's Accept-Encoding is httpx's (which may name one aiohttp cannot decode).
    """

    __slots__ = ("headers", "options", "session", "url")

    def __init__(self, session: Callable[[], aiohttp.ClientSession], template: httpx.Request) -> None:
        import aiohttp

        self.session = session
        self.url = str(template.url)
        skipped = (b"content-length", b"accept-encoding")
        self.headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in template.headers.raw if k.lower() not in skipped
        }
        timeout = template.extensions.get("timeout", {})
        self.options: dict[str, Any] = {
            "allow_redirects": False,
            "timeout": aiohttp.ClientTimeout(
                sock_connect=timeout.get("connect"), sock_read=timeout.get("read"), connect=timeout.get("pool")
            ),
        }

    @asynccontextmanager
    async def __call__(self, content: bytes) -> AsyncIterator[Streamed]:
        from httpx_aiohttp.transport import map_aiohttp_exceptions

        with map_aiohttp_exceptions():
            response = await self.session().post(self.url, data=content, headers=self.headers, **self.options)
        try:
            yield _AiohttpStreamed(response)
        finally:
            with map_aiohttp_exceptions():
                await response.__aexit__(None, None, None)  # what httpx-aiohttp's stream does on close


class _AiohttpStreamed:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        from httpx_aiohttp.transport import map_aiohttp_exceptions

        with map_aiohttp_exceptions():
            async for chunk in self._response.content.iter_any():
                yield chunk


def transport_reason(exc: httpx.HTTPError) -> TransportReason | None:
    """How an httpx failure kept a provider from its upstream, for :class:`~locopilot.errors.UpstreamError`'s
    ``reason``; None for one that is not about the connection (a bad redirect, a body that does not decode)."""
    # One name for both ways a connection is not made: httpx-aiohttp 0.2.0 maps aiohttp's
    # ClientConnectorError (refused) to httpx.ConnectTimeout, as its map tries the base class first.
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.TransportError):
        return "connection"
    return None


def retry_after_seconds(value: str | None) -> int | None:
    """An upstream's ``Retry-After`` in whole seconds; the HTTP-date form is not worth a clock here and
    reads as absent."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())
