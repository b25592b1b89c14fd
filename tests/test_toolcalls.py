"""Tool-call formats without a model: detection on real templates, rendering, parsing, streaming, grammars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from locopilot.engine.protocol import FunctionTool, Message, ToolCall, ToolChoice
from locopilot.engine.templates import ChatTemplate, TemplateRenderer
from locopilot.engine.toolcalls import CallStream, GenericStream, ToolSupport
from locopilot.engine.toolformats import FORMATS, ParsedCall, capability, detect_format

TEMPLATES = Path(__file__).parent / "templates"

# Each real template and the format llama.cpp's chat-format detection gives it.
EXPECTED = {
    "Qwen-Qwen2.5-7B-Instruct": "hermes",
    "Qwen-Qwen3-0.6B": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
    "HuggingFaceTB-SmolLM3-3B": "hermes",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
    "Mistral-Small-3.2-24B-Instruct-2506": "mistral-args",
    "unsloth-mistral-Devstral-Small-2507": "mistral-args",
    "google-gemma-3-it": "generic",
}

WEATHER = FunctionTool(
    name="get_weather",
    description="The weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def source(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.mark.parametrize(("name", "expected"), EXPECTED.items())
def test_each_real_template_gets_its_format(name: str, expected: str) -> None:
    assert detect_format(source(name)).name == expected
    assert capability(source(name)) == ("generic" if expected == "generic" else f"native:{expected}")


def test_a_template_without_tools_and_no_template_are_generic() -> None:
    assert capability("{% for m in messages %}{{ m.content }}{% endfor %}") == "generic"
    assert capability(None) == "generic"


def conversation() -> list[Message]:
    return [
        Message(role="system", content="You are terse."),
        Message(role="user", content="Weather in Paris?"),
        Message(
            role="assistant",
            tool_calls=(ToolCall(id="call_abc", name="get_weather", arguments='{"city": "Paris"}'),),
        ),
        Message(role="tool", tool_call_id="call_abc", content="sunny_and_21C"),
    ]


@pytest.mark.parametrize("name", EXPECTED)
def test_each_real_template_renders_tools_calls_and_results(name: str) -> None:
    """The whole round trip renders, and the call and its result reach the prompt in some form."""
    renderer = TemplateRenderer(ChatTemplate("gguf", source(name)), bos_token="<s>", eos_token="</s>")
    support = ToolSupport(source(name), lambda m, t: renderer.render(m, tools=t), lambda _: None)
    plan = support.plan(conversation(), (WEATHER,), ToolChoice(mode="auto"), True)
    prompt = renderer.render(plan.messages, tools=plan.tools)
    assert "sunny_and_21C" in prompt
    assert prompt.count("get_weather") >= 2  # described, and called in the history
    assert "Paris" in prompt and "Weather in Paris?" in prompt


def test_tool_dicts_and_messages_are_what_hf_templates_expect() -> None:
    captured: list[Any] = []

    def render(messages: Any, tools: Any) -> str:
        captured.append((messages, tools))
        return "get_weather probe_function_7x3q probe_result_9k2w"

    support = ToolSupport(source("Qwen-Qwen2.5-7B-Instruct"), render, lambda _: None)
    plan = support.plan(conversation(), (WEATHER,), ToolChoice(mode="auto"), True)
    assert plan.tools == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": WEATHER.description, "parameters": WEATHER.parameters},
        }
    ]
    assistant, tool = plan.messages[2], plan.messages[3]
    assert assistant["tool_calls"] == [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert tool == {"role": "tool", "content": "sunny_and_21C", "tool_call_id": "call_abc", "name": "get_weather"}


def test_mistral_templates_get_nine_character_ids_consistently() -> None:
    renderer = TemplateRenderer(ChatTemplate("gguf", source("mistralai-Mistral-Nemo-Instruct-2407")))
    support = ToolSupport(renderer.template.source, lambda m, t: renderer.render(m, tools=t), lambda _: None)
    plan = support.plan(conversation(), (WEATHER,), ToolChoice(mode="auto"), True)
    call_id = plan.messages[2]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum()
    assert plan.messages[3]["tool_call_id"] == call_id


def test_a_template_that_drops_calls_gets_them_as_the_models_own_text() -> None:
    """SmolLM3's template renders only content: the call is written into it as <tool_call> JSON."""
    renderer = TemplateRenderer(ChatTemplate("gguf", source("HuggingFaceTB-SmolLM3-3B")))
    support = ToolSupport(renderer.template.source, lambda m, t: renderer.render(m, tools=t), lambda _: None)
    assert support.caps() == (False, True)
    plan = support.plan(conversation(), (WEATHER,), ToolChoice(mode="auto"), True)
    assert (
        plan.messages[2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )


def test_gemma_gets_results_as_user_turns_that_alternate() -> None:
    renderer = TemplateRenderer(ChatTemplate("gguf", source("google-gemma-3-it")))
    support = ToolSupport(renderer.template.source, lambda m, t: renderer.render(m, tools=t), lambda _: None)
    messages = [
        *conversation()[:3],
        Message(role="tool", tool_call_id="call_abc", content="one"),
        Message(role="tool", tool_call_id="call_abc", content="two"),
    ]
    plan = support.plan(messages, (WEATHER,), ToolChoice(mode="auto"), True)
    roles = [m["role"] for m in plan.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert json.loads(plan.messages[2]["content"]) == {
        "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}
    }
    assert "You can call these tools" in plan.messages[0]["content"]
    renderer.render(plan.messages, tools=plan.tools)  # alternates, so Gemma's template does not raise


def fmt(name: str) -> Any:
    return next(f for f in FORMATS if f.name == name)


# Real-looking outputs of each format, and what they parse into.
OUTPUTS = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', 1),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        2,
    ),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', 1),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', 1),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]', 1),
    ("mistral-args", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', 1),
    ("mistral-args", '[TOOL_CALLS]get_weather[CALL_ID]abcdefghi[ARGS]{"city": "Paris"}', 1),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}', 1),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}', 1),
]


@pytest.mark.parametrize(("name", "text", "count"), OUTPUTS)
def test_each_parser_reads_real_looking_calls(name: str, text: str, count: int) -> None:
    stream = (GenericStream if name == "generic" else CallStream)(fmt(name), ["get_weather"])
    parts = [p for piece in (text[:7], text[7:20], text[20:]) for p in stream.feed(piece)] + stream.close()
    assert parts[:1] == [ParsedCall("get_weather", '{"city":"Paris"}')]
    assert len(parts) == count and stream.calls == count and stream.failures == 0


MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off
    ("hermes", '<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>'),  # not offered
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>'),  # not an object
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}} and more'),
    ("mistral", "[TOOL_CALLS] sorry"),
    ("mistral-args", "[TOOL_CALLS]get_weather{}"),
    ("generic", '{"tool_call": {"arguments": {}}}'),
]


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_a_malformed_call_comes_back_as_content_and_is_counted(name: str, text: str) -> None:
    stream = (GenericStream if name == "generic" else CallStream)(fmt(name), ["get_weather"])
    parts = stream.feed(text) + stream.close()
    assert "".join(p for p in parts if isinstance(p, str)) == text
    assert stream.failures == 1 and stream.calls == 0


def test_content_before_a_call_streams_and_a_markers_beginning_is_held_back() -> None:
    stream = CallStream(fmt("hermes"), ["get_weather"])
    assert stream.feed("Let me check. <tool") == ["Let me check. "]
    assert stream.feed("_call>\n") == []
    assert stream.feed('{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>') == []
    assert stream.close() == [ParsedCall("get_weather", '{"city":"Paris"}')]


def test_text_that_only_looked_like_a_marker_is_released() -> None:
    stream = CallStream(fmt("hermes"), ["get_weather"])
    assert stream.feed("a <tool") == ["a "]
    assert stream.feed("box>") == ["<toolbox>"]
    assert stream.close() == []


def test_llama3_json_counts_as_a_call_only_at_the_start() -> None:
    stream = CallStream(fmt("llama3"), ["get_weather"])
    assert stream.feed('Use {"name": "x"}') == ['Use {"name": "x"}']
    assert stream.close() == []
    stream = CallStream(fmt("llama3"), ["get_weather"])
    assert stream.feed(" {") == []
    assert stream.feed('"name": "get_weather", "parameters": {"city": "Paris"}}') == []
    assert stream.close() == [ParsedCall("get_weather", '{"city":"Paris"}')]


def test_the_generic_response_streams_as_content_with_escapes_decoded() -> None:
    stream = GenericStream(fmt("generic"), ["get_weather"])
    out = []
    for piece in ['{"resp', 'onse": "Hel', "lo \\", "n\\u00e9", 't\\"e"', "}"]:
        out += stream.feed(piece)
    out += stream.close()
    assert "".join(out) == 'Hello \nét"e' and stream.failures == 0


@pytest.mark.parametrize("format_name", ["hermes", "llama3", "mistral", "mistral-args", "generic"])
@pytest.mark.parametrize("parallel", [True, False])
def test_every_grammar_compiles(format_name: str, parallel: bool) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    tools = [
        WEATHER,
        FunctionTool(
            name="search",
            parameters={
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}, "tags": {"type": "array"}},
                "required": ["query"],
            },
        ),
    ]
    grammar = fmt(format_name).grammar(tools, parallel)
    LlamaGrammar.from_string(grammar, verbose=False)
    if format_name == "generic":
        LlamaGrammar.from_string(fmt(format_name).grammar_with_response(tools, parallel), verbose=False)


def test_a_named_choice_describes_every_tool_and_allows_only_the_named_one() -> None:
    renderer = TemplateRenderer(ChatTemplate("gguf", source("Qwen-Qwen2.5-7B-Instruct")))
    support = ToolSupport(renderer.template.source, lambda m, t: renderer.render(m, tools=t), lambda _: None)
    other = FunctionTool(name="get_time", parameters={"type": "object", "properties": {}})
    plan = support.plan(conversation()[:2], (other, WEATHER), ToolChoice(mode="function", name="get_weather"), True)
    assert [t["function"]["name"] for t in plan.tools or []] == ["get_time", "get_weather"]
    assert plan.grammar is not None and not plan.lazy
    assert "get_weather" in plan.grammar and "get_time" not in plan.grammar
    assert plan.stream is not None and plan.stream().allowed == {"get_weather"}


def test_a_tool_without_a_description_renders_in_hermes_3() -> None:
    renderer = TemplateRenderer(ChatTemplate("gguf", source("NousResearch-Hermes-3-Llama-3.1-8B-tool_use")))
    support = ToolSupport(renderer.template.source, lambda m, t: renderer.render(m, tools=t), lambda _: None)
    bare = FunctionTool(name="get_time", parameters={"type": "object", "properties": {}})
    plan = support.plan(conversation()[:2], (bare,), ToolChoice(mode="auto"), True)
    assert "get_time" in renderer.render(plan.messages, tools=plan.tools)


def test_auto_is_lazy_and_none_bans_a_single_token_marker() -> None:
    renderer = TemplateRenderer(ChatTemplate("gguf", source("Qwen-Qwen2.5-7B-Instruct")))
    tokens = {"<tool_call>": 151657}
    support = ToolSupport(renderer.template.source, lambda m, t: renderer.render(m, tools=t), tokens.get)
    auto = support.plan(conversation()[:2], (WEATHER,), ToolChoice(mode="auto"), True)
    assert auto.lazy and auto.trigger_tokens == (151657,) and auto.trigger_patterns == ()
    none = support.plan(conversation()[:2], (WEATHER,), ToolChoice(mode="none"), True)
    assert none.grammar is None and none.stream is None and none.banned == (151657,)
    assert none.tools is not None  # the model still knows the tools
    untokenized = ToolSupport(renderer.template.source, lambda m, t: renderer.render(m, tools=t), lambda _: None)
    lazy = untokenized.plan(conversation()[:2], (WEATHER,), ToolChoice(mode="auto"), True)
    assert lazy.trigger_patterns == ("<tool_call>",) and lazy.trigger_tokens == ()
