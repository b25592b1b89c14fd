"""Tool calls on the embedded engine, per request: the template's input, the grammar, the reply.

:class:`ToolSupport` (one per loaded model) knows the model's format (see
:mod:`locopilot.engine.toolformats`) and what its template renders; its
:meth:`~ToolSupport.plan` turns a chat request into a :class:`ToolPlan`: the
messages and tools for the template, the grammar (from the first token for
``required`` or a named function, lazy for ``auto``) and a :class:`CallStream`
that splits the generated text into content and calls.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from locopilot.engine.protocol import FunctionTool, Message, ToolChoice
from locopilot.engine.toolformats import (
    ID_ALPHABET,
    CallError,
    Generic,
    ParsedCall,
    Part,
    ToolFormat,
    detect_format,
)


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(24))


# Chat messages for a template


def template_messages(
    messages: Sequence[Message], fmt: ToolFormat, *, renders_calls: bool, renders_results: bool
) -> list[dict[str, Any]]:
    """``messages`` as Hugging Face chat templates expect them.

    Calls go in ``tool_calls`` (``arguments`` as an object: most templates ``tojson`` it) and
    results as ``tool`` messages with ``tool_call_id`` and the function's ``name``. Where the
    template cannot render them (``renders_calls``/``renders_results`` false, or the generic
    format), a call becomes the text the model writes for it and a result a user message
    ``{"tool_response": {"tool": name, "content": ...}}``; user turns that then follow one
    another are joined (Gemma's template insists on alternating roles).
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            calls = [(c.name, _arguments_object(c.arguments)) for c in message.tool_calls]
            names.update((c.id, c.name) for c in message.tool_calls)
            if renders_calls and fmt.native:
                item["tool_calls"] = [
                    {"id": fmt.history_id(c.id), "type": "function", "function": {"name": n, "arguments": a}}
                    for c, (n, a) in zip(message.tool_calls, calls, strict=True)
                ]
            else:
                item["content"] = "\n".join(filter(None, [message.content, fmt.render_call(calls)]))
        if message.role == "tool":
            name = message.name or names.get(message.tool_call_id or "", "")
            if renders_results and fmt.native:
                item["tool_call_id"] = fmt.history_id(message.tool_call_id or "")
                item["name"] = name
            else:
                response = {"tool_response": {"tool": name, "content": message.content}}
                item = {"role": "user", "content": json.dumps(response, ensure_ascii=False)}
        if out and item["role"] == "user" and out[-1]["role"] == "user" and not (renders_results and fmt.native):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + item["content"]}
            continue
        out.append(item)
    return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``messages`` with ``text`` at the start of the system message (a new one if there is none)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{text}\n\n{first['content']}".rstrip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_dicts(tools: Sequence[FunctionTool]) -> list[dict[str, Any]]:
    """Tools the way templates read them: ``{"type": "function", "function": {...}}``."""
    # Always a description: templates concatenate it (Hermes 3's fails on a missing one).
    function = ({"name": t.name, "description": t.description or "", "parameters": t.parameters} for t in tools)
    return [{"type": "function", "function": f} for f in function]


# Generated text → content and calls


class CallStream:
    """Splits one reply's text into content and calls, as it is generated.

    Content before a call's opening streams out at once, but text that may still become a
    marker is held back (as StopMatcher holds back a stop string's beginning). From the
    opening on, text is kept until the reply ends; :meth:`close` parses it. A call that does
    not parse, names a tool not offered, or has arguments that are not an object comes back
    as content, counted in ``failures``.
    """

    def __init__(self, fmt: ToolFormat, allowed: Sequence[str]) -> None:
        self.fmt = fmt
        self.allowed = set(allowed)
        self.pending = ""
        self.call_text: str | None = None
        self.started = False  # any content sent (a call "at start" can no longer begin)
        self.failures = 0
        self.calls = 0

    def feed(self, text: str) -> list[Part]:
        if self.call_text is not None:
            self.call_text += text
            return []
        self.pending += text
        opening = self._opening()
        if opening is not None:
            content, self.call_text, self.pending = self.pending[:opening], self.pending[opening:], ""
            return self._content(content)
        keep = self._hold()
        cut = len(self.pending) - keep
        content, self.pending = self.pending[:cut], self.pending[cut:]
        return self._content(content)

    def _content(self, text: str) -> list[Part]:
        if not text:
            return []
        self.started = True
        return [text]

    def _opening(self) -> int | None:
        hits = [i for i in (self.pending.find(m) for m in self.fmt.markers) if i >= 0]
        if not self.started and self.fmt.at_start is not None:
            match = re.match(self.fmt.at_start, self.pending)
            if match:
                hits.append(match.start())
        return min(hits) if hits else None

    def _hold(self) -> int:
        """How many characters at the end of ``pending`` may begin an opening."""
        keep = 0
        for marker in self.fmt.markers:
            for n in range(min(len(marker) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(marker[:n]):
                    keep = n
                    break
        if not self.started and self.fmt.at_start is not None:
            stripped = self.pending.lstrip()
            if any(form.startswith(stripped) for form in ('{"name"', '{ "name"')):
                keep = len(self.pending)
        return keep

    def close(self) -> list[Part]:
        """The rest of the reply: held-back content, or the calls (or the failed call's text)."""
        if self.call_text is None:
            rest, self.pending = self.pending, ""
            return self._content(rest)
        text, self.call_text = self.call_text, None
        try:
            calls = [self._checked(name, args) for name, args in self.fmt.parse(text)]
        except CallError:
            self.failures += 1
            return self._content(text)
        self.calls += len(calls)
        return list(calls)

    def _checked(self, name: str, args: Any) -> ParsedCall:
        if name not in self.allowed:
            raise CallError(f"a call of {name!r}, which is not offered")
        if not isinstance(args, dict):
            raise CallError("arguments that are not an object")
        return ParsedCall(name, json.dumps(args, ensure_ascii=False, separators=(",", ":")))


class GenericStream(CallStream):
    """The generic format's reply: ``{"response": "..."}`` streams its text as content."""

    _RESPONSE = re.compile(r'\s*\{\s*"response"\s*:\s*"')

    def __init__(self, fmt: ToolFormat, allowed: Sequence[str]) -> None:
        super().__init__(fmt, allowed)
        self.text = ""
        self.answer_from: int | None = None  # where the response string's characters begin
        self.answer_sent = 0  # characters of it decoded and sent
        self.answer_done = False

    def feed(self, text: str) -> list[Part]:
        self.text += text
        if self.answer_from is None:
            match = self._RESPONSE.match(self.text)
            if match is None:
                return []
            self.answer_from = match.end()
        return self._content(self._decode())

    def _decode(self) -> str:
        """The response's characters not yet sent, up to an escape that is still incomplete."""
        assert self.answer_from is not None
        out = []
        i = self.answer_from + self.answer_sent
        raw = self.text
        while i < len(raw) and not self.answer_done:
            c = raw[i]
            if c == '"':
                self.answer_done = True
                break
            if c == "\\":
                length = 6 if raw[i + 1 : i + 2] == "u" else 2
                if i + length > len(raw):
                    break
                try:
                    out.append(json.loads(f'"{raw[i : i + length]}"'))
                except json.JSONDecodeError:
                    out.append(raw[i : i + length])
                i += length
                continue
            out.append(c)
            i += 1
        self.answer_sent = i - self.answer_from
        return "".join(out)

    def close(self) -> list[Part]:
        if self.answer_from is not None:
            return []
        text, self.text = self.text, ""
        if not text.strip():
            return []
        try:
            calls = [self._checked(name, args) for name, args in self.fmt.parse(text)]
        except CallError:
            self.failures += 1
            return self._content(text)
        self.calls += len(calls)
        return list(calls)


# One request's plan


@dataclass
class ToolPlan:
    """How one chat request runs: what the template gets, the grammar, how the reply is read.

    ``grammar`` (GBNF) applies from the first token, or with ``lazy`` from the first trigger:
    ``trigger_patterns`` are regexes (std::regex ECMAScript, searched in the text so far; the
    grammar takes the text from group 1, else from the match).
    ``trigger_tokens``: tokens that trigger it (markers that are one token of the vocabulary).
    ``banned``: tokens a model may not write (``tool_choice`` ``none``: single-token markers).
    ``stream`` makes each generated sequence its reader (several with ``n`` > 1); None when
    no call can come.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    grammar: str | None = None
    lazy: bool = False
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()
    banned: tuple[int, ...] = ()
    stream: Callable[[], CallStream] | None = None


Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]
"""Renders messages and tools with the model's template; raises on a template failure."""

_PROBE_NAME, _PROBE_RESULT = "probe_function_7x3q", "probe_result_9k2w"


class ToolSupport:
    """A model's tool calling: its format, and what its template renders (probed once)."""

    def __init__(self, source: str | None, render: Render, single_token: Callable[[str], int | None]) -> None:
        self.format = detect_format(source)
        self._render = render
        self._single_token = single_token
        self._caps: tuple[bool, bool] | None = None

    def caps(self) -> tuple[bool, bool]:
        """Whether the template renders an assistant's ``tool_calls``, and ``tool`` results.

        Learnt by rendering a probe conversation (as llama.cpp's minja does): a template that
        drops them, or raises, gets them as text instead (:func:`template_messages`).
        """
        if self._caps is None:
            self._caps = (False, False)
            if self.format.native:
                call_id = self.format.history_id("call_probe")
                call = {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": call_id, "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"a": 1}}}
                    ],
                }
                result = {"role": "tool", "tool_call_id": call_id, "name": _PROBE_NAME, "content": _PROBE_RESULT}
                user = {"role": "user", "content": "hi"}
                self._caps = (self._probe([user, call], _PROBE_NAME), self._probe([user, call, result], _PROBE_RESULT))
        return self._caps

    def _probe(self, messages: list[dict[str, Any]], needle: str) -> bool:
        try:
            return needle in self._render(messages, None)
        except Exception:  # noqa: BLE001 - any failure of the template means "cannot"
            return False

    def plan(
        self, messages: Sequence[Message], tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool
    ) -> ToolPlan:
        """The plan for a chat; ValueError when a tool's schema cannot be made a grammar."""
        fmt = self.format
        needs_caps = any(m.tool_calls or m.role == "tool" for m in messages)
        renders_calls, renders_results = self.caps() if needs_caps else (True, True)
        chat = template_messages(messages, fmt, renders_calls=renders_calls, renders_results=renders_results)
        if not tools:
            return ToolPlan(chat)
        parallel = parallel and fmt.parallel
        described = tool_dicts(tools)  # every tool is described; a named choice constrains the grammar alone
        if choice.mode == "function":
            tools = [t for t in tools if t.name == choice.name]
        if choice.mode == "none":
            if not fmt.native:
                return ToolPlan(chat)
            banned = (self._single_token(m) for m in fmt.markers)
            return ToolPlan(chat, described, banned=tuple(t for t in banned if t is not None))
        forced = choice.mode in ("required", "function")
        allowed = [t.name for t in tools]
        if isinstance(fmt, Generic):
            chat = with_system(chat, fmt.instructions(tools, choice, parallel))
            grammar = fmt.grammar(tools, parallel) if forced else fmt.grammar_with_response(tools, parallel)
            return ToolPlan(chat, described, grammar=grammar, stream=lambda: GenericStream(fmt, allowed))
        tokens = {m: self._single_token(m) for m in fmt.markers}
        return ToolPlan(
            chat,
            described,
            grammar=fmt.grammar(tools, parallel),
            lazy=not forced,
            trigger_patterns=(
                *(re.escape(m) for m, token in tokens.items() if token is None),
                *((fmt.at_start,) if fmt.at_start else ()),
            ),
            trigger_tokens=tuple(t for t in tokens.values() if t is not None),
            stream=lambda: CallStream(fmt, allowed),
        )
