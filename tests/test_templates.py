"""Chat templates: the choice of template, the fallbacks, and the sandbox."""

from __future__ import annotations

import pytest

from locopilot.engine.templates import ChatTemplate, TemplateError, TemplateRenderer, choose_template

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


def test_the_models_own_template_wins() -> None:
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chosen = choose_template({"tokenizer.chat_template": own, "general.architecture": "gemma3"})
    assert chosen == ChatTemplate("gguf", own)


@pytest.mark.parametrize(
    ("arch", "name"), [("gemma3", "gemma"), ("gemma2", "gemma"), ("llama", "chatml"), ("", "chatml")]
)
def test_fallback_by_architecture(arch: str, name: str) -> None:
    assert choose_template({"general.architecture": arch, "tokenizer.chat_template": "  "}).name == name


def test_chatml_fallback_renders_every_turn() -> None:
    prompt = TemplateRenderer(choose_template({})).render(CHAT)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert choose_template({}).stop == ("<|im_end|>",)


def test_gemma_fallback_folds_the_system_message_into_the_first_user_turn() -> None:
    renderer = TemplateRenderer(choose_template({"general.architecture": "gemma3"}), bos_token="<bos>")
    assert renderer.render(CHAT) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}",
        # An unsafe attribute fails the render: Jinja's default would print it as "".
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__ }}{{ messages[0]['content'] }}",
    ],
)
def test_templates_cannot_reach_python_internals(source: str) -> None:
    with pytest.raises(TemplateError):
        TemplateRenderer(ChatTemplate("gguf", source)).render(CHAT)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{% for i in range(10 ** 9) %}{% endfor %}", "OverflowError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ],
)
def test_any_exception_a_template_raises_is_a_template_error(source: str, fragment: str) -> None:
    with pytest.raises(TemplateError, match=fragment):
        TemplateRenderer(ChatTemplate("gguf", source)).render(CHAT)


def test_raise_exception_in_a_template_is_a_template_error() -> None:
    source = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    with pytest.raises(TemplateError, match="no system role"):
        TemplateRenderer(ChatTemplate("gguf", source)).render(CHAT)


def test_a_template_that_does_not_compile() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        TemplateRenderer(ChatTemplate("gguf", "{% for %}"))


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
        ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "steps"),
        ("{{ 'x' * 10**9 }}", "value over"),
        ("{{ [1] * 10**9 }}", "value over"),
        ("{{ 10 ** 100000000 }}", "power over"),
    ],
)
def test_templates_cannot_exhaust_time_or_memory(source: str, fragment: str) -> None:
    renderer = TemplateRenderer(ChatTemplate("gguf", source))
    with pytest.raises(TemplateError, match=fragment):
        renderer.render([{"role": "user", "content": "hi"}])


def test_the_limits_leave_a_long_chat_alone() -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(500)]
    prompt = TemplateRenderer(choose_template({})).render(messages)
    assert "turn 499" in prompt
