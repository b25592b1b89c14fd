"""The request path's hops through the server: a screened body in one receive, a disconnect
watcher only for a reply that lasts (locopilot.gateway.hygiene.until_length, streaming.Watched)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from locopilot.gateway.hygiene import until_length
from locopilot.gateway.streaming import WATCH_AFTER, Watched


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def scripted(messages: list[dict[str, Any]]) -> tuple[Any, list[float]]:
    """A receive that answers ``messages`` in turn (then waits for ever), and the times it was called."""
    calls: list[float] = []

    async def receive() -> dict[str, Any]:
        calls.append(time.monotonic())
        if len(calls) <= len(messages):
            return messages[len(calls) - 1]
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive, calls


def granian_body(*pieces: bytes) -> list[dict[str, Any]]:
    """A body as granian delivers it: every piece with ``more_body``, then an empty last message."""
    return [{"type": "http.request", "body": p, "more_body": True} for p in pieces] + [
        {"type": "http.request", "body": b"", "more_body": False}
    ]


@pytest.mark.anyio
async def test_the_piece_that_completes_the_announced_length_is_the_last() -> None:
    receive, calls = scripted(granian_body(b'{"model":', b'"m"}'))
    scope: Any = {"type": "http", "headers": [(b"content-type", b"application/json"), (b"content-length", b"13")]}
    shimmed = until_length(scope, receive)
    first: Any = await shimmed()
    second: Any = await shimmed()
    assert (first["body"], first["more_body"]) == (b'{"model":', True)
    assert (second["body"], second["more_body"]) == (b'"m"}', False)
    assert len(calls) == 2  # granian's empty last message is never asked for


@pytest.mark.anyio
async def test_without_a_length_every_message_is_read() -> None:
    receive, _ = scripted(granian_body(b"{}"))
    scope: Any = {"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}
    assert until_length(scope, receive) is receive


@pytest.mark.anyio
async def test_a_short_block_never_listens_for_a_disconnect() -> None:
    receive, calls = scripted([{"type": "http.disconnect"}])
    stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with Watched(receive, stopped) as watched:
        await asyncio.sleep(0)
    await asyncio.sleep(WATCH_AFTER * 2)
    assert (watched.ended, calls) == (None, [])


@pytest.mark.anyio
async def test_a_long_block_is_cut_short_when_the_client_leaves() -> None:
    receive, calls = scripted([{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}])
    stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    began = time.monotonic()
    async with Watched(receive, stopped) as watched:
        await asyncio.sleep(30)
    assert watched.ended == "disconnected"
    assert len(calls) == 2 and calls[0] - began >= WATCH_AFTER * 0.9
    assert time.monotonic() - began < 10


@pytest.mark.anyio
async def test_the_end_of_the_grace_cuts_a_block_short_at_once() -> None:
    receive, calls = scripted([])
    stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.001, stopped.set_result, None)
    async with Watched(receive, stopped) as watched:
        await asyncio.sleep(30)
    assert (watched.ended, calls) == ("stopped", [])
