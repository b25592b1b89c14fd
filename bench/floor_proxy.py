"""The floor of the gateway's stack: the smallest proxy on granian + Litestar + aiohttp.

One route, POST /v1/chat/completions, forwards the request body unchanged to the
upstream over one aiohttp session and sends back what the upstream answered: the
whole body for JSON, the upstream's network reads one by one for SSE. No
validation, routing, accounting or logging. What locopilot adds over this target
is its own work; what this target adds over the upstream is the stack's.

Served like ``locopilot serve``: granian, one ASGI worker, on 127.0.0.1.

Usage: python bench/floor_proxy.py --port 8001 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    global _session  # one session per worker, made on the worker's loop
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)
    return _session


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@post("/v1/chat/completions", status_code=200)
async def chat(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    body = await request.body()
    url = os.environ["FLOOR_UPSTREAM"] + "/v1/chat/completions"
    upstream = await session().post(url, data=body, headers={"content-type": "application/json"})
    if upstream.content_type != "text/event-stream":
        content = await upstream.read()
        return Response(content, status_code=upstream.status, media_type=upstream.content_type)

    async def relay() -> AsyncIterator[bytes]:
        async with upstream:
            async for chunk in upstream.content.iter_any():
                yield chunk

    return Stream(relay(), media_type="text/event-stream")


def app_factory(_target: str = "") -> Litestar:
    return Litestar([health, chat])


def main() -> None:
    from granian.constants import Interfaces
    from granian.server import Server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's root URL, without /v1")
    args = parser.parse_args()
    os.environ["FLOOR_UPSTREAM"] = args.upstream.rstrip("/")
    server = Server(target="floor", address="127.0.0.1", port=args.port, interface=Interfaces.ASGI, workers=1)
    server.serve(target_loader=app_factory)


if __name__ == "__main__":
    main()
