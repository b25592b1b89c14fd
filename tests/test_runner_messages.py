"""The pipe between the API process and a runner: messages written per round, read per receive,
and Deltas that piled up behind a slow reader merged (no model needed)."""

from __future__ import annotations

import io
import os

import anyio
import pytest

from locopilot.children import AsyncReceiver, Codec, ProtocolError, Receiver, Sender
from locopilot.engine import protocol
from locopilot.engine.protocol import Delta, Done, FromRunner, Started, TokenLogprob
from locopilot.engine.scheduling import Cancellations, Outbox
from locopilot.engine.supervisor import _coalesced


class Chunks:
    """A byte stream that hands out the given chunks, one per receive, then ends (like a pipe)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.chunks:
            raise anyio.EndOfStream
        chunk = self.chunks.pop(0)
        assert len(chunk) <= max_bytes
        return chunk


MESSAGES: list[FromRunner] = [
    Started(id=1, prompt_tokens=5),
    Delta(id=1, text="Hel", tokens=1),
    Delta(id=2, text="é", tokens=1),
    Done(id=1, finish_reason="stop", prompt_tokens=5, completion_tokens=1),
]


async def read_all(reader: AsyncReceiver[FromRunner]) -> list[list[FromRunner]]:
    batches = []
    while (batch := await reader.receive_all()) is not None:
        batches.append(batch)
    return batches


def test_one_receive_gives_every_message_that_arrived() -> None:
    data = b"".join(map(Codec.encode, MESSAGES))
    assert anyio.run(read_all, AsyncReceiver(Chunks([data]), protocol.from_runner)) == [MESSAGES]  # type: ignore[arg-type]


def test_frames_split_anywhere_come_out_whole() -> None:
    data = b"".join(map(Codec.encode, MESSAGES))
    for size in (1, 3, 7):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        batches = anyio.run(read_all, AsyncReceiver(Chunks(chunks), protocol.from_runner))  # type: ignore[arg-type]
        assert [m for batch in batches for m in batch] == MESSAGES


def test_a_stream_that_ends_inside_a_frame_is_a_protocol_error() -> None:
    data = Codec.encode(MESSAGES[1])
    with pytest.raises(ProtocolError):
        anyio.run(read_all, AsyncReceiver(Chunks([data[:-1]]), protocol.from_runner))  # type: ignore[arg-type]


def test_deltas_waiting_together_come_as_one_and_the_terminal_message_after_them() -> None:
    async def main() -> list[FromRunner]:
        send, receive = anyio.create_memory_object_stream[FromRunner](10)
        for text in ("a", "b", "c"):
            send.send_nowait(Delta(id=1, text=text, tokens=1))
        send.send_nowait(Done(id=1, finish_reason="length", prompt_tokens=2, completion_tokens=3))
        send.send_nowait(Delta(id=1, text="late", tokens=1))
        send.close()
        with receive:
            return [message async for message in _coalesced(receive)]

    assert anyio.run(main) == [
        Delta(id=1, text="abc", tokens=3),
        Done(id=1, finish_reason="length", prompt_tokens=2, completion_tokens=3),
        Delta(id=1, text="late", tokens=1),
    ]


def test_deltas_of_different_choices_stay_apart_and_keep_their_logprobs() -> None:
    first, second, third = (TokenLogprob(token=t, logprob=-0.5) for t in "abc")

    async def main() -> list[FromRunner]:
        send, receive = anyio.create_memory_object_stream[FromRunner](10)
        send.send_nowait(Delta(id=1, text="a", tokens=1, index=0, logprobs=(first,)))
        send.send_nowait(Delta(id=1, text="b", tokens=1, index=0, logprobs=(second,)))
        send.send_nowait(Delta(id=1, text="c", tokens=1, index=1, logprobs=(third,)))
        send.send_nowait(Delta(id=1, text="d", tokens=1, index=0))
        send.close()
        with receive:
            return [message async for message in _coalesced(receive)]

    assert anyio.run(main) == [
        Delta(id=1, text="ab", tokens=2, index=0, logprobs=(first, second)),
        Delta(id=1, text="c", tokens=1, index=1, logprobs=(third,)),
        Delta(id=1, text="d", tokens=1, index=0),
    ]


def test_a_reader_that_keeps_up_gets_each_delta_alone() -> None:
    async def main() -> list[FromRunner]:
        send, receive = anyio.create_memory_object_stream[FromRunner](10)
        got: list[FromRunner] = []

        async def consume() -> None:
            with receive:
                async for message in _coalesced(receive):
                    got.append(message)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consume)
            for text in ("a", "b"):
                await anyio.wait_all_tasks_blocked()
                send.send_nowait(Delta(id=1, text=text, tokens=1))
            await anyio.wait_all_tasks_blocked()
            send.close()
        return got

    assert anyio.run(main) == [Delta(id=1, text="a", tokens=1), Delta(id=1, text="b", tokens=1)]


def test_an_outbox_writes_a_round_at_once_and_then_ends_its_jobs() -> None:
    out = io.BytesIO()
    channel = Sender(out)
    writes: list[int] = []
    cancellations = Cancellations()
    cancellations.begin(1)

    def send(messages: list[FromRunner]) -> None:
        writes.append(len(messages))
        channel.send_all(messages)

    outbox = Outbox(send, cancellations)
    outbox.flush()  # nothing to write: no write
    for message in MESSAGES:
        outbox.put(message)
    cancellations.cancel(1)
    assert 1 in cancellations
    outbox.flush()
    assert writes == [len(MESSAGES)]
    assert 1 not in cancellations  # Done(id=1) went out: its cancellation record is gone
    reading, writing = os.pipe()
    os.write(writing, out.getvalue())
    os.close(writing)
    assert list(Receiver(reading, protocol.from_runner)) == MESSAGES
    os.close(reading)
