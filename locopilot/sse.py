"""Server-sent events, read: the one SSE reader (:class:`EventParser`), for every stream this code base
reads, an upstream's (:mod:`locopilot.providers.openai_compat`) and a locopilot server's
(:mod:`locopilot.client`). Writing them is :func:`locopilot.gateway.streaming.sse`'s.

Nothing but the standard library, so the command line can read a stream without loading an HTTP stack.
"""

from __future__ import annotations

import codecs
import re

_LINE_END = re.compile(r"\r\n|\r(?!$)|\n")
"""A line break, except a CR at the end of the text, which may be half of a CRLF split between reads."""


class EventParser:
    """Server-sent events from the bytes of a stream: ``("data", text)`` per event, ``(name, text)``
    for an event named by an ``event:`` line (locopilot's pull progress), and ``("error", text)``
    per ``error:`` line, which llama-server sends in place of a data event.

    Comments and other fields are ignored; an event cut off by the end of the
    stream is dropped, as the SSE spec says. Lines end in LF, CRLF or CR.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """The events completed by ``chunk``."""
        lines = _LINE_END.split(self._partial + self._decoder.decode(chunk))
        self._partial = lines.pop()
        events: list[tuple[str, str]] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append((self._event or "data", "\n".join(self._data)))
                    self._data.clear()
                self._event = ""
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "data":
                    self._data.append(value)
                elif field == "event":
                    self._event = value
                elif field == "error":
                    events.append(("error", value))
        return events
