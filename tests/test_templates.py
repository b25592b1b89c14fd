"""Chat templates: the choice of template, the fallbacks, the sandbox, and the capped helper process."""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from locopilot.engine.template_process import IsolatedRenderer
from locopilot.engine.templates import MAX_PROMPT_CHARS, ChatTemplate, TemplateError, TemplateRenderer, choose_template

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


#: Templates that build gigabytes by ways the sandbox is never asked about, by name. Each would
#: need far more than the helper's memory; the in-process checks stop the first four early.
MEMORY_ATTACKS = {
    "tilde-doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{{ ns.s|length }}",
    "plus-doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
    "{{ ns.s|length }}",
    "set-chain": "{% set a = 'x' * 1000000 %}{% set b = a ~ a ~ a ~ a %}{% set c = b ~ b ~ b ~ b %}"
    "{% set d = c ~ c ~ c ~ c %}{{ d|length }}",
    "output": "{% set big = 'x' * 100000 %}{% for i in range(100000) %}{{ big }}{% endfor %}",
    "center": "{{ 'x'|center(2 ** 31) }}",
    "indent": "{{ ('x\n' * 500000)|indent(2000) }}",
    "replace": "{{ ('x' * 1000000)|replace('x', 'y' * 1000) }}",
    "join": "{{ (['x' * 1000000] * 1000)|join }}",
    "wordwrap": "{{ ('x ' * 200000)|wordwrap(1, wrapstring='y' * 10000) }}",
    "format": "{{ '%2000000000s'|format('x') }}",
    "str-format": "{{ '{:>2000000000}'.format('x') }}",
    "percent": "{{ '%2000000000d' % 1 }}",
    "sum": "{% set l = [0] * 1000000 %}{{ ([l + l + l + l] * 100)|sum(start=[]) }}",
    "pprint": "{{ (['x' * 1000000] * 1000)|pprint }}",
    "tojson": "{{ (['x' * 1000000] * 1000)|tojson }}",
    "string": "{{ (['x' * 1000000] * 1000)|string }}",
    "set-block": "{% set big = 'x' * 100000 %}{% set body %}{% for i in range(100000) %}{{ big }}{% endfor %}"
    "{% endset %}{{ body|length }}",
    # Jinja runs a filter with constant arguments while compiling.
    "constant": "{{ 'x'|center(900000000) }}",
}
BENIGN = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def branching(attacks: dict[str, str]) -> str:
    """One template that runs the attack the last message names, and a harmless chat for ``benign``."""
    branches = "".join(f"{{% elif probe == '{name}' %}}{attack}" for name, attack in attacks.items())
    return f"{{% set probe = messages[-1]['content'] %}}{{% if probe == 'benign' %}}{BENIGN}{branches}{{% endif %}}"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        (MEMORY_ATTACKS["tilde-doubling"], "value over"),
        (MEMORY_ATTACKS["plus-doubling"], "value over"),
        (MEMORY_ATTACKS["set-chain"], "value over"),
        ("{% autoescape true %}" + MEMORY_ATTACKS["set-chain"] + "{% endautoescape %}", "value over"),
        (
            "{% macro twice(s) %}{{ s ~ s }}{% endmacro %}{% set a = 'x' * 1000000 %}{{ twice(a ~ a ~ a) }}",
            "value over",
        ),
        (
            "{% set ns = namespace(l=[0]) %}{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
            "value over",
        ),
        (MEMORY_ATTACKS["output"], "renders over"),
    ],
)
def test_joins_and_the_output_are_capped_in_process(source: str, fragment: str) -> None:
    with pytest.raises(TemplateError, match=fragment):
        TemplateRenderer(ChatTemplate("gguf", source)).render(ask("hi"))


def test_a_prompt_as_long_as_the_cap_renders() -> None:
    content = "x" * (MAX_PROMPT_CHARS - 100)
    assert TemplateRenderer(ChatTemplate("gguf", BENIGN)).render(ask(content)).count("x") == len(content)


HELPER_MEMORY = 128 << 20


@pytest.fixture(scope="module")
def hostile() -> Iterator[IsolatedRenderer]:
    renderer = IsolatedRenderer(ChatTemplate("gguf", branching(MEMORY_ATTACKS)), memory_limit=HELPER_MEMORY)
    yield renderer
    renderer.close()


def _peak_rss(pid: int) -> int:
    """VmHWM of a running process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced by Linux")
@pytest.mark.parametrize("attack", sorted(MEMORY_ATTACKS))
def test_a_memory_attack_fails_in_the_helper_and_the_next_render_works(hostile: IsolatedRenderer, attack: str) -> None:
    hostile.check()
    ours, helper = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, hostile.pid
    with pytest.raises(TemplateError, match="chat template"):
        hostile.render(ask(attack))
    if hostile.pid == helper is not None:  # stopped by an in-process check; else it died at its limit
        assert _peak_rss(helper) < HELPER_MEMORY + (100 << 20)
    assert hostile.render(ask("benign")) == "<|im_start|>user\nbenign<|im_end|>\n"
    # The test process (the runner, in the server) never held the attack's values.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - ours < 64 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_helper_is_another_process_with_capped_address_space(hostile: IsolatedRenderer) -> None:
    hostile.check()
    assert hostile.pid is not None and hostile.pid != os.getpid()
    limits = Path(f"/proc/{hostile.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max address space"))
    soft = line.split()[3]
    assert soft != "unlimited" and int(soft) <= (1 << 30)


def test_the_helper_renders_what_the_sandbox_renders() -> None:
    template = choose_template({"general.architecture": "gemma3"})
    isolated = IsolatedRenderer(template, bos_token="<bos>")
    try:
        assert isolated.render(CHAT) == TemplateRenderer(template, bos_token="<bos>").render(CHAT)
        assert isolated.render(CHAT, add_generation_prompt=False).endswith("<start_of_turn>user\nBye<end_of_turn>\n")
    finally:
        isolated.close()


def test_the_helper_reports_template_errors_and_compile_errors() -> None:
    failing = IsolatedRenderer(ChatTemplate("gguf", "{{ raise_exception('no system role') }}"))
    broken = IsolatedRenderer(ChatTemplate("gguf", "{% for %}"))
    try:
        with pytest.raises(TemplateError, match="no system role"):
            failing.render(CHAT)
        with pytest.raises(TemplateError, match="no system role"):
            failing.render(CHAT)  # an ordinary failure keeps the helper
        with pytest.raises(TemplateError, match="does not compile"):
            broken.check()
        with pytest.raises(TemplateError, match="does not compile"):
            broken.render(CHAT)
    finally:
        failing.close()
        broken.close()


def test_a_render_past_the_timeout_kills_the_helper_and_the_next_one_starts_afresh() -> None:
    # Slow in few steps (each join of 100,000 numbers is milliseconds), so that the step
    # limit (MAX_RENDER_STEPS) cannot end it first on a fast machine.
    slow = "{% if messages[0]['content'] == 'slow' %}{% for i in range(5000) %}"
    slow += "{% set s = range(100000)|map('string')|join %}{% endfor %}{% endif %}done"
    renderer = IsolatedRenderer(ChatTemplate("gguf", slow), timeout=0.3)
    try:
        renderer.check()
        first = renderer.pid
        with pytest.raises(TemplateError, match=r"took over 0\.3 s"):
            renderer.render(ask("slow"))
        assert renderer.pid is None
        renderer.timeout = 30
        assert renderer.render(ask("fast")) == "done"
        assert renderer.pid not in (None, first)
    finally:
        renderer.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_helper_killed_between_renders_is_replaced() -> None:
    renderer = IsolatedRenderer(ChatTemplate("gguf", BENIGN))
    try:
        renderer.check()
        pid = renderer.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)  # dead, not yet reaped: what the renderer finds after an OOM kill
        assert renderer.render(ask("hi")) == "<|im_start|>user\nhi<|im_end|>\n"
    finally:
        renderer.close()
