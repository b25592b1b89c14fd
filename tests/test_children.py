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
