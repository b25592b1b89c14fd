"""Chat templates: which one a model uses, and rendering it in a sandbox.

A GGUF's own ``tokenizer.chat_template`` wins. A model without one gets a
fallback chosen by architecture (Gemma's turn format for ``gemma*``), else
ChatML. The choice is a plain value so ``/v1/models/{id}`` can show it without
loading the model. Templates run in Jinja's ImmutableSandboxedEnvironment:
a template from a downloaded file may not reach Python internals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import msgspec
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


def choose_template(metadata: Mapping[str, Any]) -> ChatTemplate:
    own = metadata.get("tokenizer.chat_template")
    if isinstance(own, str) and own.strip():
        return ChatTemplate("gguf", own)
    arch = str(metadata.get("general.architecture", ""))
    name = "gemma" if arch.startswith("gemma") else "chatml"
    source, stop = FALLBACKS[name]
    return ChatTemplate(name, source, stop)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class TemplateRenderer:
    """Compiles one template once; :meth:`render` turns messages into a prompt."""

    def __init__(self, template: ChatTemplate, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._compiled = env.from_string(template.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
