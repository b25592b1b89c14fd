"""Chat templates compiled and rendered in a helper process whose memory is capped.

The sandbox in :mod:`locopilot.engine.templates` keeps a template away from
Python's internals and bounds its steps, but it cannot bound the memory a
template builds: Jinja calls filters directly (``center``, ``indent``,
``replace``, ``join``, ``wordwrap``, ``format`` widths, ``tojson`` of a list
that holds one big string many times), ``{% set %}`` blocks collect output
unseen, and the compiler runs filters with constant arguments at compile time.
Rather than wrap every operation, a runner keeps one long-lived helper
(``locopilot _render``, the same executable) that limits its own address space
(RLIMIT_AS) to its size at start plus :data:`MEMORY_LIMIT`: a template that
builds too much gets a MemoryError there, its request fails with
:class:`~locopilot.engine.templates.TemplateError`, and the runner, its model
and its other requests never see the allocation.

A render costs the runner one round trip over a pipe (frames as in
:mod:`locopilot.children`). A helper that dies, hangs past
:data:`RENDER_TIMEOUT` or runs out of memory is replaced: the next render
starts a new one. RLIMIT_AS is enforced by Linux; on macOS only the in-process
checks of templates.py apply.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from locopilot.children import Child, Codec, ProtocolError, Receiver, Sender, prologue
from locopilot.engine.templates import ChatTemplate, TemplateError, TemplateRenderer

log = logging.getLogger("locopilot.runner")

MEMORY_LIMIT = 512 << 20
"""Bytes of address space a helper may add to what it had after its imports."""
RENDER_TIMEOUT = 20.0
"""Seconds a render may take before its helper is killed; real templates take milliseconds,
a render at the step limit about a second or two."""
START_TIMEOUT = 60.0
"""Seconds a new helper may take to import Jinja and compile the template (a loaded machine is slow)."""


class Compile(msgspec.Struct, tag="compile", frozen=True, kw_only=True):
    """The first message: the helper caps its memory (bytes beyond its size now), then compiles."""

    memory_limit: int
    source: str
    name: str
    bos_token: str
    eos_token: str


class Render(msgspec.Struct, tag="render", frozen=True, kw_only=True):
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None


class Compiled(msgspec.Struct, tag="compiled", frozen=True):
    pass


class Rendered(msgspec.Struct, tag="rendered", frozen=True):
    text: str


class RenderFailed(msgspec.Struct, tag="failed", frozen=True):
    message: str
    fatal: bool = False  # the helper exits after sending this (it ran out of memory)


ToHelper = Compile | Render
FromHelper = Compiled | Rendered | RenderFailed

to_helper: Codec[ToHelper] = Codec(ToHelper)
from_helper: Codec[FromHelper] = Codec(FromHelper)


# The helper process


def _address_space() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def limit_memory(extra: int) -> bool:
    """Cap this process's address space at its present size plus ``extra``; False where that is not possible."""
    size = _address_space()
    if size is None:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))
    except (ValueError, OSError):
        return False
    return True


def main() -> int:
    """Entry point of ``locopilot _render``: serve Compile and Render frames on stdin until it closes."""
    out = Sender(prologue())
    requests = Receiver(0, to_helper)
    renderer: TemplateRenderer | None = None
    limit: int | None = None
    failure = "the chat template was not compiled"
    while True:
        reply: FromHelper
        try:
            request = requests.receive()
            if request is None:
                return 0
            match request:
                case Compile(memory_limit=memory_limit, source=source, name=name, bos_token=bos, eos_token=eos):
                    if limit is None:
                        limit = memory_limit
                        if not limit_memory(limit):
                            print(
                                "locopilot _render: this system cannot cap the memory of chat templates",
                                file=sys.stderr,
                            )
                    renderer = TemplateRenderer(ChatTemplate(name, source), bos_token=bos, eos_token=eos)
                    reply = Compiled()
                case Render(messages=messages, add_generation_prompt=add, tools=tools):
                    if renderer is None:
                        raise TemplateError(failure)
                    reply = Rendered(renderer.render(messages, add_generation_prompt=add, tools=tools))
        except TemplateError as exc:
            if renderer is None:
                failure = str(exc)
            # A MemoryError leaves the heap grown (glibc keeps what it freed), so this
            # helper makes way for a fresh one rather than sit on it.
            if isinstance(exc.__cause__, MemoryError):
                reply = RenderFailed(f"{exc} (a render may use {(limit or 0) >> 20} MiB)", fatal=True)
            else:
                reply = RenderFailed(str(exc))
        except MemoryError:
            reply = RenderFailed(
                f"chat template ran out of memory (a render may use {(limit or 0) >> 20} MiB)", fatal=True
            )
        out.send(reply)
        if isinstance(reply, RenderFailed) and reply.fatal:
            return 1


# The runner's side


class IsolatedRenderer:
    """Renders one template in a helper process; :meth:`render` is TemplateRenderer's.

    The constructor starts the helper and returns; :meth:`check` waits until it has
    compiled the template, raising TemplateError when it does not compile (as
    TemplateRenderer's constructor does), and the first render waits likewise.
    Not thread-safe: one thread (the runner's main thread) uses it. :meth:`close`
    ends the helper; so does the end of this process (the helper reads end of input).
    """

    def __init__(
        self,
        template: ChatTemplate,
        *,
        bos_token: str = "",
        eos_token: str = "",
        memory_limit: int = MEMORY_LIMIT,
        timeout: float = RENDER_TIMEOUT,
    ) -> None:
        self.template = template
        self.timeout = timeout
        self._compile = Compile(
            memory_limit=memory_limit,
            source=template.source,
            name=template.name,
            bos_token=bos_token,
            eos_token=eos_token,
        )
        self._child: Child[FromHelper] | None = None
        self._compiled = False
        self._failure: str | None = None  # why the template does not compile
        self._start()

    def check(self) -> None:
        """Wait until the helper has compiled the template; TemplateError if it does not compile.

        A helper that has died since the last render (killed from outside) is replaced first.
        """
        if self._child is not None and self._child.process.poll() is not None:
            self.close(0)
        if self._child is None:
            self._start()
        if not self._compiled:
            self._await_compiled()
        if self._failure is not None:
            raise TemplateError(self._failure)

    def _start(self) -> None:
        """Start a helper and send it the template; its answer is read by the next render."""
        try:
            self._child = Child("_render", from_helper)
        except OSError as exc:
            raise TemplateError(f"chat template failed: its render process did not start: {exc}") from exc
        self._compiled, self._failure = False, None
        self._send(self._compile)

    def _send(self, message: ToHelper) -> None:
        assert self._child is not None
        try:
            self._child.send(message)
        except (OSError, ValueError) as exc:
            self.close(0)
            raise TemplateError("chat template failed: its render process ended") from exc

    def _receive(self, timeout: float) -> FromHelper:
        assert self._child is not None
        try:
            reply = self._child.receive(timeout)
        except TimeoutError as exc:
            self.close(0)
            raise TemplateError(f"chat template took over {timeout:g} s to render") from exc
        except ProtocolError as exc:
            self.close(0)
            raise TemplateError(f"chat template failed: its render process broke the protocol: {exc}") from exc
        if reply is None:
            self.close(0)
            raise TemplateError("chat template failed: its render process ended (out of memory or killed)")
        if isinstance(reply, RenderFailed) and reply.fatal:
            self.close(0)
            # The replacement imports and compiles while the runner goes on; the next render waits for it.
            self._start()
        return reply

    def _await_compiled(self) -> None:
        reply = self._receive(START_TIMEOUT)
        match reply:
            case Compiled():
                self._compiled = True
            case RenderFailed(message=message):
                self._compiled, self._failure = True, message
            case _:
                self.close(0)
                raise TemplateError(f"chat template failed: its render process answered {type(reply).__name__}")

    @property
    def pid(self) -> int | None:
        """The running helper's process id, if one runs."""
        return None if self._child is None else self._child.pid

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt; raises TemplateError for any failure of the template or its helper."""
        self.check()
        request = Render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None if tools is None else [dict(t) for t in tools],
        )
        self._send(request)
        match self._receive(self.timeout):
            case Rendered(text=text):
                return text
            case RenderFailed(message=message):
                raise TemplateError(message)
            case reply:
                self.close(0)
                raise TemplateError(f"chat template failed: its render process answered {type(reply).__name__}")

    def close(self, grace: float = 2.0) -> None:
        """End the helper: close its input, and kill it if it lingers ``grace`` seconds
        (0: at once, for a helper that failed). The next render starts a new one."""
        child, self._child = self._child, None
        if child is not None:
            child.close(grace)
