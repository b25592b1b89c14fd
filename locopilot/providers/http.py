"""The HTTP transport under every upstream client.

httpx is the client API everywhere; underneath it runs either aiohttp (through
httpx-aiohttp) or httpx's own httpcore transport. Measured with
bench/gateway.py: httpcore costs about twice aiohttp's CPU per request and its
throughput falls as concurrency rises, so aiohttp is the default.

Both never retry (the router decides what to try next) and never cap the
number of connections: the upstream queues work itself, and a cap here would
turn load into pool timeouts that look like outages.
"""

from __future__ import annotations

import httpx

from locopilot.errors import TransportReason
from locopilot.settings import UpstreamTransport


def upstream_transport(kind: UpstreamTransport = "aiohttp") -> httpx.AsyncBaseTransport:
    if kind == "httpx":
        return httpx.AsyncHTTPTransport(retries=0, limits=httpx.Limits(max_connections=None))
    # Imported here, when an upstream is configured: aiohttp is a third of the server's
    # imports (about 0.1 s of CPU at every start), and a server without upstreams needs none of it.
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    # The session is made on first use: aiohttp wants a running event loop for it.
    # limit=0 is aiohttp's "no cap" (httpx-aiohttp would otherwise leave aiohttp's 100).
    # trust_env=False: proxies come from settings, never from the environment behind its back.
    return AiohttpTransport(
        client=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False),
    )


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
