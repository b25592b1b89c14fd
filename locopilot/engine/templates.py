"""Chat templates: which one a model uses, and rendering it in a sandbox.

A GGUF's own ``tokenizer.chat_template`` wins. A model without one gets a
fallback chosen by architecture (Gemma's turn format for ``gemma*``), else
ChatML. The choice is a plain value so ``/v1/models/{id}`` can show it without
loading the model. Templates run in Jinja's ImmutableSandboxedEnvironment:
a template from a downloaded file may not reach Python internals. Reading an
unsafe attribute fails the render, and so does any exception a template raises
(:class:`TemplateError` either way). The sandbox does not bound work, so a
render is also limited: ``*`` and ``**`` may not build values larger than
:data:`MAX_VALUE_SIZE`, ``+`` and ``~`` no text or list longer than
:data:`MAX_PROMPT_CHARS`, the output may not grow past it either, and a render
that runs more than :data:`MAX_RENDER_STEPS` template lines (nested loops) fails.

These checks make the common runaways fail early with a clear message, but they
cannot bound memory: filters (``center``, ``indent``, ``replace``, ``join``,
``wordwrap``, ``format``, ``tojson`` of a list holding one big string many
times) and ``{% set %}`` blocks build values Jinja never shows the sandbox, and
Jinja even runs filters with constant arguments while compiling. So the runner
compiles and renders a model's template only in a separate process whose memory
is capped (:mod:`locopilot.engine.template_process`).
"""

from __future__ import annotations

import json
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import msgspec
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma has no system role: a system message is folded into the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' and ns.system %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

FALLBACKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML, ("<|im_end|>",)),
    "gemma": (GEMMA, ("<end_of_turn>",)),
}


class ChatTemplate(msgspec.Struct, frozen=True):
    """``name`` is ``gguf`` for the model's own template, else the fallback's name."""

    name: str
    source: str
    stop: tuple[str, ...] = ()


class TemplateError(ValueError):
    """The template failed to render (a bug in the template, or messages it rejects)."""


MAX_VALUE_SIZE = 1 << 20
"""Characters or items a template's ``*`` may produce; ``**`` exponents are capped likewise small."""
MAX_EXPONENT = 256
MAX_RENDER_STEPS = 2_000_000
"""Template lines a render may run; real chat templates run a few hundred per message."""
MAX_PROMPT_CHARS = 4 << 20
"""Characters a rendered prompt (and any text or list a template joins with ``+`` or ``~``) may have:
some million tokens, more than any model's context holds."""


def _check_length(value: Any) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > MAX_PROMPT_CHARS:
        raise TemplateError(f"chat template builds a value over {MAX_PROMPT_CHARS} long")
    return value


def _bounded_str_join(seq: Any) -> str:
    return str(_check_length(jinja2.runtime.str_join(seq)))


def _bounded_markup_join(seq: Any) -> str:
    return str(_check_length(jinja2.runtime.markup_join(seq)))


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja answers an unsafe attribute with an undefined value that prints as "",
        # so `{{ f.__globals__ }}` would render and the probe would pass unnoticed.
        raise SecurityError(f"chat template reads the unsafe attribute {attribute!r} of a {type(obj).__name__}")

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for sized, count in ((left, right), (right, left)):
                sequence = isinstance(sized, str | list | tuple) and isinstance(count, int)
                if sequence and len(sized) * max(count, 0) > MAX_VALUE_SIZE:
                    raise TemplateError(f"chat template builds a value over {MAX_VALUE_SIZE} long")
            return operator.mul(left, right)
        if op == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT:
                raise TemplateError(f"chat template raises to a power over {MAX_EXPONENT}")
            return operator.pow(left, right)
        if op == "+":
            return _check_length(operator.add(left, right))
        return super().call_binop(context, op, left, right)


def _bounded(render: Callable[[], str]) -> str:
    """``render()``, stopped with TemplateError after MAX_RENDER_STEPS lines of template code.

    Template code compiled by Jinja has the file name ``<template>``; only its
    lines are counted, so the cost falls on templates alone.
    """
    steps = 0

    def in_template(frame: FrameType, event: str, _arg: Any) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > MAX_RENDER_STEPS:
                raise TemplateError(f"chat template ran over {MAX_RENDER_STEPS} steps")
        return in_template

    def on_call(frame: FrameType, _event: str, _arg: Any) -> Any:
        return in_template if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return render()
    finally:
        sys.settrace(previous)


def choose_template(metadata: Mapping[str, Any]) -> ChatTemplate:
    own = metadata.get("tokenizer.chat_template")
    if isinstance(own, str) and own.strip():
        return ChatTemplate("gguf", own)
    arch = str(metadata.get("general.architecture", ""))
    name = "gemma" if arch.startswith("gemma") else "chatml"
    source, stop = FALLBACKS[name]
    return ChatTemplate(name, source, stop)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: Hugging Face transformers marks the assistant's
    part of a template with it (SmolLM3's does); here it renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - the type Extension declares

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """Hugging Face's ``tojson`` (the one chat templates are written for): plain JSON, not Jinja's
    HTML-escaped kind, which would turn ``<`` into ``\\u003c`` inside a prompt."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class TemplateRenderer:
    """Compiles one template once; :meth:`render` turns messages into a prompt."""

    def __init__(self, template: ChatTemplate, *, bos_token: str = "", eos_token: str = "") -> None:
        env = _BoundedSandbox(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined, extensions=[_GenerationBlock]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._compiled = env.from_string(template.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc
        except (MemoryError, RecursionError) as exc:
            raise TemplateError(f"chat template does not compile: {type(exc).__name__}") from exc
        # `~` compiles to a call of str_join (markup_join under autoescape), names the
        # compiled module imports from jinja2.runtime into its own globals (shared by its
        # macros and blocks); the sandbox is never asked, so bounded versions replace them there.
        namespace = self._compiled.root_render_func.__globals__
        namespace["str_join"], namespace["markup_join"] = _bounded_str_join, _bounded_markup_join

    def _generate(self, variables: dict[str, Any]) -> str:
        pieces: list[str] = []
        size = 0
        for piece in self._compiled.generate(variables):
            size += len(piece)
            if size > MAX_PROMPT_CHARS:
                raise TemplateError(f"chat template renders over {MAX_PROMPT_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        try:
            return _bounded(
                lambda: self._generate(
                    {
                        "messages": list(messages),
                        "add_generation_prompt": add_generation_prompt,
                        "bos_token": self.bos_token,
                        "eos_token": self.eos_token,
                        "tools": tools,
                    }
                )
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
        except MemoryError as exc:
            raise TemplateError("chat template ran out of memory") from exc
        except Exception as exc:
            # The template is code from the model file: whatever it raises (the sandbox's
            # OverflowError for a huge range, RecursionError, ZeroDivisionError, ...) is its failure.
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
