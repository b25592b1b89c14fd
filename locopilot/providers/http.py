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
