"""Where locopilot leans on its dependencies' private internals: the one list.

Each is pinned below the next minor release in ``pyproject.toml`` (:data:`PINS`), and
``tests/test_dependency_internals.py`` runs :func:`problems`, so an upgrade that breaks one
fails a test by name instead of misbehaving at run time. Before raising a pin, check the
place and the test against the new version.

1. **httpx: the transport call** (:func:`locopilot.providers.http.streaming_post`, over httpx's own
   transport). A generation request skips ``AsyncClient.stream``: it copies a request the client built once
   (its ``url``, ``headers.raw`` and ``extensions``, where httpx keeps the client's timeout) and
   hands it to the transport's ``handle_async_request``, about a fifth of the loop's CPU per
   proxied request. Relies on ``build_request`` putting the timeout in ``extensions["timeout"]``.
2. **Litestar: the streaming response's slots** (:class:`locopilot.gateway.streaming._WatchedBody`).
   It adopts a prepared ``ASGIStreamingResponse`` by copying every ``__slots__`` entry of its
   classes, then sends ``iterator`` (encoded with ``encoding``) from its own ``send_body(send,
   receive)``, so the last chunk carries ``more_body: False`` and the drain can end a stream.
3. **granian: the server's internals** (:class:`locopilot.server.DrainingServer`). It subclasses
   ``granian.server.mp.MPServer``, overrides ``signal_handler_interrupt`` and
   ``signal_handler_reload``, and reads ``self.wrks`` (the workers), ``worker.inner.pid`` and
   ``worker.kill()``.
4. **httpx: its command-line module** (:func:`locopilot.server.skip_httpx_command_line`). The
   server puts a placeholder at ``sys.modules["httpx._main"]`` before httpx loads, so that
   ``import httpx`` does not bring click, rich and pygments; relies on httpx's ``__init__``
   importing ``main`` from ``._main`` and nothing else of it.
5. **httpx-aiohttp: its session and exception map** (:func:`locopilot.providers.http.streaming_post`,
   over aiohttp). A generation request goes to aiohttp's session directly: it takes the session from
   ``AiohttpTransport.client`` (made by ``get_client()`` on first use), translates aiohttp's
   exceptions with ``httpx_aiohttp.transport.map_aiohttp_exceptions`` and closes a response as the
   transport's stream does (``ClientResponse.__aexit__``). httpx-aiohttp is pinned to one release
   (``==``), so it is not in :data:`PINS`.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

#: The upper bounds ``pyproject.toml`` pins, by distribution: the first release not checked.
PINS = {"httpx": "0.29", "litestar": "2.26", "granian": "2.9"}


def _below(installed: str, bound: str) -> bool:
    def parts(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())

    return parts(installed) < parts(bound)


def problems() -> list[str]:
    """What no longer holds of the three places, one line each; empty when all hold."""
    found = [
        f"{name} {version(name)} is not below {bound}, the release the internals were checked against"
        for name, bound in PINS.items()
        if not _below(version(name), bound)
    ]
    found += _httpx() + _httpx_command_line() + _httpx_aiohttp() + _litestar() + _granian()
    return found


def _httpx() -> list[str]:
    import httpx

    found = []
    with httpx.Client(base_url="http://127.0.0.1:9", timeout=httpx.Timeout(7.0)) as client:  # never sends
        request = client.build_request("POST", "/v1/chat/completions")
    if request.extensions.get("timeout") != httpx.Timeout(7.0).as_dict():
        found.append("httpx: build_request no longer puts the client's timeout in extensions['timeout']")
    if not isinstance(getattr(request.headers, "raw", None), list):
        found.append("httpx: Headers.raw is no longer a list of (name, value) byte pairs")
    if not callable(getattr(httpx.AsyncBaseTransport, "handle_async_request", None)):
        found.append("httpx: AsyncBaseTransport.handle_async_request is gone")
    return found


def _httpx_command_line() -> list[str]:
    import httpx

    imports = [line.strip() for line in inspect.getsource(httpx).splitlines() if "_main" in line]
    if imports != ["from ._main import main"]:
        return [f"httpx: __init__ no longer imports just main from ._main ({imports})"]
    return []


def _httpx_aiohttp() -> list[str]:
    from httpx_aiohttp import AiohttpTransport, transport

    found = []
    if not callable(getattr(transport, "map_aiohttp_exceptions", None)):
        found.append("httpx-aiohttp: transport.map_aiohttp_exceptions is gone")
    made = AiohttpTransport(client=lambda: None)  # type: ignore[arg-type, return-value]
    if not callable(getattr(made, "get_client", None)) or not hasattr(made, "client"):
        found.append("httpx-aiohttp: AiohttpTransport no longer keeps its session in .client, made by get_client()")
    return found


def _litestar() -> list[str]:
    from litestar.response import Stream
    from litestar.response.streaming import ASGIStreamingResponse

    found = []
    slots = {slot for cls in ASGIStreamingResponse.__mro__ for slot in getattr(cls, "__slots__", ())}
    missing = {"iterator", "encoding", "headers", "status_code", "background"} - slots
    if missing:
        found.append(f"litestar: ASGIStreamingResponse has no slots {sorted(missing)}")
    if list(inspect.signature(ASGIStreamingResponse.send_body).parameters) != ["self", "send", "receive"]:
        found.append("litestar: ASGIStreamingResponse.send_body is no longer (send, receive)")
    if not callable(getattr(Stream, "to_asgi_response", None)):
        found.append("litestar: Stream.to_asgi_response is gone")
    return found


def _granian() -> list[str]:
    from granian.server import common, mp

    found = []
    for name in ("signal_handler_interrupt", "signal_handler_reload"):
        if not callable(getattr(mp.MPServer, name, None)):
            found.append(f"granian: MPServer.{name} is gone")
    if "self.wrks" not in inspect.getsource(common.AbstractServer):
        found.append("granian: the server no longer keeps its workers in self.wrks")
    worker = inspect.getsource(mp.WorkerProcess) + inspect.getsource(common.AbstractWorker)
    if "self.inner" not in worker or not callable(getattr(mp.WorkerProcess, "kill", None)):
        found.append("granian: a worker no longer has .inner (its process) and .kill()")
    return found
