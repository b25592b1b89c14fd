"""The children's frames over a real pipe: the blocking reader with a deadline, what it keeps
for the next call, and what it refuses (no child process needed)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest

from locopilot.children import HEADER, MAX_FRAME, Codec, ProtocolError, Receiver, Sender


class Ping(msgspec.Struct, tag="ping", frozen=True):
    n: int


class Pong(msgspec.Struct, tag="pong", frozen=True):
    text: str


codec: Codec[Ping | Pong] = Codec(Ping | Pong)


class Pipe:
    def __init__(self) -> None:
        self.reading, self.writing = os.pipe()
        self.open = [self.reading, self.writing]

    def close(self, fd: int) -> None:
        """Close ``fd`` once (a second close could close another file that got its number)."""
        if fd in self.open:
            self.open.remove(fd)
            os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    made = Pipe()
    yield made
    for fd in list(made.open):
        made.close(fd)


def test_a_deadline_passes_and_the_message_that_comes_later_is_whole(pipe: Pipe) -> None:
    reading, writing = pipe.reading, pipe.writing
    receiver = Receiver(reading, codec)
    frame = Codec.encode(Pong("late"))
    os.write(writing, frame[:3])  # part of the header only
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        receiver.receive(timeout=0.2)
    assert time.monotonic() - started >= 0.2
    threading.Timer(0.1, os.write, (writing, frame[3:])).start()
    assert receiver.receive(timeout=5) == Pong("late")


def test_what_came_with_a_message_waits_for_the_next_call(pipe: Pipe) -> None:
    reading, writing = pipe.reading, pipe.writing
    with os.fdopen(os.dup(writing), "wb") as out:
        Sender(out).send_all([Ping(1), Pong("two"), Ping(3)])
    pipe.close(writing)
    receiver = Receiver(reading, codec)
    assert receiver.receive(timeout=1) == Ping(1)
    # The rest was read with the first; no more bytes are needed (nor waited for) to get them.
    assert receiver.receive(timeout=0) == Pong("two")
    assert list(receiver) == [Ping(3)]
    assert receiver.receive() is None


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (HEADER.pack(MAX_FRAME + 1), "exceeds"),
        (Codec.encode(Pong("cut"))[:-1], "ended inside a frame"),
        (HEADER.pack(3) + b"\x93\x01\x02", "Expected"),  # a msgpack array, not a tagged Struct
        (Codec.encode(msgspec.defstruct("Other", [("x", int)], tag="other")(1)), "Invalid value 'other'"),
    ],
)
def test_bad_frames_are_protocol_errors(pipe: Pipe, data: bytes, fragment: str) -> None:
    reading, writing = pipe.reading, pipe.writing
    os.write(writing, data)
    pipe.close(writing)
    with pytest.raises(ProtocolError, match=fragment):
        Receiver(reading, codec).receive(timeout=5)


def test_receive_all_takes_what_has_arrived_and_waits_only_when_asked(pipe: Pipe) -> None:
    reading, writing = pipe.reading, pipe.writing
    receiver = Receiver(reading, codec)
    assert receiver.receive_all(timeout=0) == []  # a look: nothing there, no wait
    started = time.monotonic()
    assert receiver.receive_all(timeout=0.2) == []
    assert time.monotonic() - started >= 0.2
    # Everything written so far comes in one call, even more than one read's worth.
    big = Pong("x" * 100_000)
    frames = Codec.encode(Ping(1)) + Codec.encode(big) + Codec.encode(Ping(3))
    writer = threading.Thread(target=os.write, args=(writing, frames))
    writer.start()
    got: list[Ping | Pong] = []
    while len(got) < 3:
        more = receiver.receive_all(timeout=5)
        assert more
        got += more
    writer.join()
    assert got == [Ping(1), big, Ping(3)]
    # A blocking call returns as soon as one message is there, with the part of the next one kept.
    second = Codec.encode(Ping(5))
    os.write(writing, Codec.encode(Ping(4)) + second[:2])
    assert receiver.receive_all() == [Ping(4)]
    os.write(writing, second[2:] + Codec.encode(Ping(6)))
    pipe.close(writing)
    # What came before the end of input first, then None (and None again).
    assert receiver.receive_all() == [Ping(5), Ping(6)]
    assert receiver.receive_all() is None
    assert receiver.receive_all(timeout=0) is None
    assert receiver.receive() is None
