"""Tool calls on the embedded engine: which syntax a chat template uses, grammars, parsing.

A model's template decides how it calls tools. :func:`detect_format` reads the
template's source (as llama.cpp's ``common/chat.cpp`` does, by the markers it
contains) and picks one :class:`ToolFormat` from :data:`FORMATS`:

========== =========================================================== ===========================
format     what the model writes                                       templates
========== =========================================================== ===========================
hermes     ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` Hermes 2/3, Qwen 2.5, Qwen 3
                                                                       (``<think>`` first), SmolLM3
llama3     ``{"name": ..., "parameters": {...}}``, also after           Llama 3.1, 3.2, 3.3
           ``<|python_tag|>``
mistral    ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``          Mistral Nemo, Mistral 7B v0.3
mistral-   ``[TOOL_CALLS]name[ARGS]{...}`` (``[CALL_ID]id`` allowed)     Mistral Small 3.2, Devstral,
args                                                                   Magistral, Ministral 3
generic    one JSON object (see :class:`Generic`)                      any other (SmolLM2, Gemma 3)
========== =========================================================== ===========================

Each format builds a GBNF grammar from the tools' JSON schemas (one rule set per
tool, see :func:`argument_rules`) that admits only its own call syntax with
schema-valid arguments; ``tool_choice`` ``required`` or a named function applies
it from the first token, ``auto`` lazily, from the moment a call marker appears
(llama.cpp's lazy grammar: :attr:`ToolFormat.markers` are its trigger words).
:class:`CallStream` turns generated text into content and calls.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec

from locopilot.engine.protocol import FunctionTool, Message, ToolChoice


class ParsedCall(msgspec.Struct, frozen=True):
    """A complete call: ``arguments`` is compact JSON text of an object."""

    name: str
    arguments: str


Part = str | ParsedCall
"""What a :class:`CallStream` yields: content text, or a whole call."""


class CallError(ValueError):
    """Generated text that opened a call but is not a valid one."""


# Grammars


def _prefix_rules(gbnf: str, prefix: str) -> str:
    """``gbnf`` with every rule name prefixed, so several converted schemas live in one grammar."""
    out = []
    for line in gbnf.splitlines():
        if "::=" not in line:
            continue
        name, rhs = line.split("::=", 1)
        out.append(f"{prefix}{name.strip()} ::={_prefix_rhs(rhs, prefix)}")
    return "\n".join(out)


def _prefix_rhs(rhs: str, prefix: str) -> str:
    pieces: list[str] = []
    i = 0
    while i < len(rhs):
        c = rhs[i]
        if c in '"[{':
            close = {'"': '"', "[": "]", "{": "}"}[c]
            j = i + 1
            while rhs[j] != close:
                j += 2 if rhs[j] == "\\" else 1
            pieces.append(rhs[i : j + 1])
            i = j + 1
        elif c.isalnum() or (c == "-" and pieces and pieces[-1][-1:].isalnum()):
            j = i
            while j < len(rhs) and (rhs[j].isalnum() or rhs[j] == "-"):
                j += 1
            pieces.append(prefix + rhs[i:j])
            i = j
        else:
            pieces.append(c)
            i += 1
    return "".join(pieces)


def _literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    return json.dumps(text)


def argument_rules(tools: Sequence[FunctionTool]) -> tuple[str, list[str]]:
    """GBNF rules for each tool's arguments (a JSON object valid against its schema) and the rule names.

    Raises ValueError when a schema cannot be turned into a grammar.
    """
    from locopilot.engine.sampling import json_grammar

    rules, names = [], []
    for i, tool in enumerate(tools):
        prefix = f"tool{i}-"
        rules.append(_prefix_rules(json_grammar(json.dumps(tool.parameters)), prefix))
        names.append(f"{prefix}root")
    return "\n".join(rules), names


SP = 'tc-sp ::= " "?\ntc-nl ::= "\\n"?'


def _json_call(name: str, args_rule: str, key: str = "arguments") -> str:
    """``{"name": "NAME", "<key>": ARGS}`` with the spacing models write."""
    return (
        f'"{{" tc-sp "\\"name\\"" tc-sp ":" tc-sp {_literal(_literal(name))} tc-sp "," tc-sp '
        f'"\\"{key}\\"" tc-sp ":" tc-sp {args_rule} tc-sp "}}"'
    )


def _alternatives(items: Iterable[str]) -> str:
    return "(" + " | ".join(items) + ")"


# Parsing helpers

_decoder = json.JSONDecoder()


def _json_at(text: str, start: int) -> tuple[Any, int]:
    """The JSON value at ``text[start:]`` (after whitespace) and where it ends; CallError if none."""
    while start < len(text) and text[start] in " \t\r\n":
        start += 1
    try:
        return _decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise CallError(f"not JSON: {exc}") from exc


def _call_from(obj: Any, args_key: str = "arguments") -> tuple[str, Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise CallError("a call without a name")
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters")))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise CallError("arguments are not JSON") from exc
    return obj["name"], args


class ToolFormat(ABC):
    """One tool-call syntax. Subclasses are stateless; :data:`FORMATS` holds one of each.

    ``markers``: text that opens a call (the lazy grammar's triggers; streaming holds back what
    may become one). ``at_start``: a regex (of llama.cpp's lazy patterns) for a call that may
    open the reply without a marker, its group 1 where the call's text begins.
    ``parallel``: whether the template can render several calls in one message.
    """

    name: ClassVar[str]
    native: ClassVar[bool] = True
    markers: ClassVar[tuple[str, ...]] = ()
    at_start: ClassVar[str | None] = None
    parallel: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def detect(cls, source: str) -> bool:
        """Whether a template with this source uses this format."""

    @abstractmethod
    def call_rules(self, names: Sequence[str], args: Sequence[str], parallel: bool) -> str:
        """GBNF rules whose ``root`` is one call (or, if ``parallel``, several) of the named tools."""

    @abstractmethod
    def parse(self, text: str) -> list[tuple[str, Any]]:
        """The calls in ``text``, which starts at a call's opening; CallError if malformed."""

    def render_call(self, calls: Sequence[tuple[str, Any]]) -> str:
        """A past assistant turn's calls as this model would have written them (for templates
        that do not render ``tool_calls`` themselves)."""
        return "".join(
            f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n</tool_call>"
            for n, a in calls
        )

    def history_id(self, call_id: str) -> str:
        """The id a past call or tool result carries in the prompt."""
        return call_id

    def grammar(self, tools: Sequence[FunctionTool], parallel: bool) -> str:
        rules, args = argument_rules(tools)
        return "\n".join([rules, SP, self.call_rules([t.name for t in tools], args, parallel)])


class Hermes(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>",)

    @classmethod
    def detect(cls, source: str) -> bool:
        return "<tool_call>" in source

    def call_rules(self, names: Sequence[str], args: Sequence[str], parallel: bool) -> str:
        call = _alternatives(_json_call(n, a) for n, a in zip(names, args, strict=True))
        block = f'"<tool_call>" tc-nl {call} tc-nl "</tool_call>"'
        more = " (tc-nl tc-block)*" if parallel else ""
        return f"tc-block ::= {block}\nroot ::= tc-block{more}"

    def parse(self, text: str) -> list[tuple[str, Any]]:
        calls = []
        for block in text.split("<tool_call>")[1:]:
            obj, end = _json_at(block, 0)
            rest = block[end:].strip()
            if rest and not rest.startswith("</tool_call>"):
                raise CallError("text after a call")
            calls.append(_call_from(obj))
        return calls


class Llama3(ToolFormat):
    name = "llama3"
    markers = ("<|python_tag|>",)
    at_start = r'^\s*(\{ ?"name")'
    parallel = False  # its template raises on more than one call per message

    @classmethod
    def detect(cls, source: str) -> bool:
        return "<|start_header_id|>ipython<|end_header_id|>" in source

    def call_rules(self, names: Sequence[str], args: Sequence[str], parallel: bool) -> str:
        call = _alternatives(_json_call(n, a, "parameters") for n, a in zip(names, args, strict=True))
        return f'root ::= ("<|python_tag|>")? {call}'

    def parse(self, text: str) -> list[tuple[str, Any]]:
        body = text.removeprefix("<|python_tag|>")
        obj, end = _json_at(body, 0)
        if body[end:].strip():
            raise CallError("text after a call")
        return [_call_from(obj, "parameters")]

    def render_call(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)


_ID_ALPHABET = string.ascii_letters + string.digits


def _nine(call_id: str) -> str:
    """A 9-character alphanumeric id for ``call_id`` (Mistral's templates refuse any other)."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "".join(chars)


class MistralArgs(ToolFormat):
    """Newer Mistral templates: each call is ``[TOOL_CALLS]name[ARGS]{...}``."""

    name = "mistral-args"
    markers = ("[TOOL_CALLS]",)

    @classmethod
    def detect(cls, source: str) -> bool:
        return "[TOOL_CALLS]" in source and "[ARGS]" in source

    def call_rules(self, names: Sequence[str], args: Sequence[str], parallel: bool) -> str:
        call = _alternatives(f'{_literal(n)} "[ARGS]" {a}' for n, a in zip(names, args, strict=True))
        return f'tc-call ::= "[TOOL_CALLS]" {call}\nroot ::= tc-call{"+" if parallel else ""}'

    def parse(self, text: str) -> list[tuple[str, Any]]:
        calls = []
        for part in text.split("[TOOL_CALLS]")[1:]:
            head, sep, body = part.partition("[ARGS]")
            if not sep:
                raise CallError("a call without [ARGS]")
            name = head.split("[CALL_ID]")[0].strip()
            obj, end = _json_at(body, 0)
            if body[end:].strip():
                raise CallError("text after a call")
            calls.append((name, obj))
        return calls

    def render_call(self, calls: Sequence[tuple[str, Any]]) -> str:
        return "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a, ensure_ascii=False)}" for n, a in calls)

    def history_id(self, call_id: str) -> str:
        return _nine(call_id)


class Mistral(ToolFormat):
    """Mistral Nemo and Mistral 7B v0.3: ``[TOOL_CALLS]`` and a JSON list of calls."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    @classmethod
    def detect(cls, source: str) -> bool:
        return "[TOOL_CALLS]" in source

    def call_rules(self, names: Sequence[str], args: Sequence[str], parallel: bool) -> str:
        call = _alternatives(_json_call(n, a) for n, a in zip(names, args, strict=True))
        more = ' ("," tc-sp tc-call)*' if parallel else ""
        return f'tc-call ::= {call}\nroot ::= "[TOOL_CALLS]" "[" tc-call{more} "]"'

    def parse(self, text: str) -> list[tuple[str, Any]]:
        obj, end = _json_at(text, len("[TOOL_CALLS]"))
        if not isinstance(obj, list) or not obj or text[end:].strip():
            raise CallError("[TOOL_CALLS] without a list of calls")
        return [_call_from(item) for item in obj]

    def render_call(self, calls: Sequence[tuple[str, Any]]) -> str:
        items = [{"name": n, "arguments": a} for n, a in calls]
        return "[TOOL_CALLS]" + json.dumps(items, ensure_ascii=False)

    def history_id(self, call_id: str) -> str:
        return _nine(call_id)


class Generic(ToolFormat):
    """For templates that know no tools (llama.cpp's generic format, the same JSON).

    The tools are described in the system message and the whole reply is one JSON object:
    ``{"tool_call": {"name": ..., "arguments": {...}}}`` for one call,
    ``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`` for several (when
    ``parallel_tool_calls`` allows), or ``{"response": "..."}`` to answer in text (not with
    ``tool_choice`` ``required`` or a named function). A grammar holds every reply to this
    shape, so the answer of ``response`` is streamed as content as it is written.
    """

    name = "generic"
    native = False

    @classmethod
    def detect(cls, source: str) -> bool:
        return True

    def call_rules(self, names: Sequence[str], args: Sequence[str], parallel: bool) -> str:
        call = _alternatives(_json_call(n, a) for n, a in zip(names, args, strict=True))
        one = '"{" tc-sp "\\"tool_call\\"" tc-sp ":" tc-sp tc-call tc-sp "}"'
        many = '"{" tc-sp "\\"tool_calls\\"" tc-sp ":" tc-sp "[" tc-call ("," tc-sp tc-call)* "]" tc-sp "}"'
        return f"tc-call ::= {call}\ntc-calls ::= {one}{' | ' + many if parallel else ''}\nroot ::= tc-calls"

    def grammar_with_response(self, tools: Sequence[FunctionTool], parallel: bool) -> str:
        """The grammar of ``auto``: calls or ``{"response": "..."}``."""
        from locopilot.engine.sampling import json_grammar

        answer = _prefix_rules(json_grammar('{"type": "string"}'), "tc-answer-")
        response = '"{" tc-sp "\\"response\\"" tc-sp ":" tc-sp tc-answer-root tc-sp "}"'
        calls = self.grammar(tools, parallel).replace("root ::= tc-calls", f"root ::= tc-calls | {response}")
        return f"{calls}\n{answer}"

    def parse(self, text: str) -> list[tuple[str, Any]]:
        obj, end = _json_at(text, 0)
        if text[end:].strip() or not isinstance(obj, dict):
            raise CallError("not one JSON object")
        if "tool_call" in obj:
            return [_call_from(obj["tool_call"])]
        if isinstance(obj.get("tool_calls"), list) and obj["tool_calls"]:
            return [_call_from(item) for item in obj["tool_calls"]]
        raise CallError("neither tool_call nor tool_calls")

    def render_call(self, calls: Sequence[tuple[str, Any]]) -> str:
        items = [{"name": n, "arguments": a} for n, a in calls]
        body = {"tool_call": items[0]} if len(items) == 1 else {"tool_calls": items}
        return json.dumps(body, ensure_ascii=False)

    def instructions(self, tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool) -> str:
        """The system text that describes the tools and the reply's JSON shape."""
        listing = json.dumps(
            [{"name": t.name, "description": t.description or "", "parameters": t.parameters} for t in tools],
            ensure_ascii=False,
        )
        shapes = ['{"tool_call": {"name": "<tool name>", "arguments": {<arguments>}}} to call a tool']
        if parallel:
            shapes.append('{"tool_calls": [<several such calls>]} to call several at once')
        if choice.mode == "auto":
            shapes.append('{"response": "<your answer>"} to answer the user directly')
        return (
            f"You can call these tools (each one's arguments follow its JSON Schema):\n{listing}\n"
            f"Respond in JSON format, with one object: {', or '.join(shapes)}."
        )


FORMATS: tuple[ToolFormat, ...] = (Hermes(), MistralArgs(), Mistral(), Llama3(), Generic())
"""Checked in order: the first whose ``detect`` accepts a template's source is its format."""


def detect_format(source: str | None) -> ToolFormat:
    """The tool-call format of a chat template (``generic`` for one that knows no tools)."""
    if source:
        for fmt in FORMATS:
            if fmt.native and fmt.detect(source):
                return fmt
    return FORMATS[-1]


def capability(source: str | None) -> str:
    """``native:<format>`` for a template that calls tools itself, else ``generic``."""
    fmt = detect_format(source)
    return f"native:{fmt.name}" if fmt.native else "generic"


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


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
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


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
    ``stream`` is None when no call can come.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    grammar: str | None = None
    lazy: bool = False
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()
    banned: tuple[int, ...] = ()
    stream: CallStream | None = None


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
            return ToolPlan(chat, described, grammar=grammar, stream=GenericStream(fmt, allowed))
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
            stream=CallStream(fmt, allowed),
        )
