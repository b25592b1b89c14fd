"""Tool-call formats: which syntax a chat template teaches its model, its grammar, its parser.

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
:mod:`locopilot.engine.toolcalls` runs them for each request.
"""

from __future__ import annotations

import hashlib
import json
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import msgspec

from locopilot.engine.protocol import FunctionTool, ToolChoice


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


ID_ALPHABET = string.ascii_letters + string.digits


def _nine(call_id: str) -> str:
    """A 9-character alphanumeric id for ``call_id`` (Mistral's templates refuse any other)."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, len(ID_ALPHABET))
        chars.append(ID_ALPHABET[digit])
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
