"""Tool calling on the embedded engine, through the real server with the official openai client.

SmolLM2-135M's template knows no tools, so these run the generic format: a grammar
built from the tools' schemas holds its reply to a call (or, with ``auto``, a call
or an answer). Arguments are checked against the declared schema with jsonschema-rs,
a validator independent of the grammar.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest

from tests.conftest import SMOL, Server

pytestmark = pytest.mark.slow

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The current weather in a city.", "parameters": WEATHER_SCHEMA},
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    """The shared server's client, patient: on a loaded 2-core machine a 40-token reply has taken over 2 minutes."""
    patient = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    yield patient
    patient.close()


def valid_call(call: Any, name: str = "get_weather", schema: Any = WEATHER_SCHEMA) -> dict[str, Any]:
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema_rs.validate(schema, arguments)
    return arguments  # type: ignore[no-any-return]


def test_required_call_is_schema_valid(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) >= 1
    for call in choice.message.tool_calls:
        valid_call(call)


def test_named_call_streamed_as_openai_streams_it(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SMOL,
        messages=ASK,
        tools=[TIME, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            if part.id is not None:  # the first piece of a call: id, type and name
                assert part.index not in calls
                assert part.function is not None and part.function.name
                calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
            if part.function is not None and part.function.arguments:
                calls[part.index]["arguments"] += part.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema_rs.validate(WEATHER_SCHEMA, json.loads(calls[0]["arguments"]))


def test_parallel_calls_off_means_one_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    valid_call(calls[0])


def test_round_trip_with_a_tool_result(client: openai.OpenAI) -> None:
    """The result goes back to the model, which answers in text when it may not call again."""
    first = client.chat.completions.create(
        model=SMOL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    answer = client.chat.completions.create(
        model=SMOL, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30
    )
    message = answer.choices[0].message
    assert message.tool_calls is None
    assert message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    again = client.chat.completions.create(
        model=SMOL, messages=history, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=40
    )
    check_auto(again)


def check_auto(reply: Any) -> None:
    """``auto``: a valid call, or an answer in text; never both missing, never a malformed call."""
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            valid_call(call)
    else:
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")


def test_auto_calls_or_answers(client: openai.OpenAI) -> None:
    check_auto(client.chat.completions.create(model=SMOL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40))
    check_auto(
        client.chat.completions.create(
            model=SMOL,
            messages=[{"role": "user", "content": "Say hello."}],
            tools=[WEATHER],
            tool_choice="auto",
            temperature=0,
            max_tokens=25,
        )
    )


def test_auto_streams_an_answer_as_content(client: openai.OpenAI) -> None:
    """The generic format's {"response": "..."} reaches the client as plain content, in pieces."""
    stream = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Say hello to Anna."}],
        tools=[WEATHER],
        temperature=0,
        max_tokens=25,
        stream=True,
    )
    content, calls, finish = [], 0, None
    for chunk in stream:
        if chunk.choices:
            content.append(chunk.choices[0].delta.content or "")
            calls += len(chunk.choices[0].delta.tool_calls or [])
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(content)
    if not calls and finish == "stop":
        assert text and not text.lstrip().startswith("{")
        assert sum(1 for piece in content if piece) > 1


def test_none_never_calls(client: openai.OpenAI) -> None:
    for stream in (False, True):
        reply: Any = client.chat.completions.create(
            model=SMOL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice="none",
            temperature=0,
            max_tokens=15,
            stream=stream,
        )
        if stream:
            chunks = [c for c in reply if c.choices]
            assert not any(c.choices[0].delta.tool_calls for c in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        else:
            assert reply.choices[0].message.tool_calls is None
            assert reply.choices[0].message.content
            assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_model_card_says_how_tools_are_called(server: Server) -> None:
    card = httpx.get(f"{server.url}/v1/models/{SMOL}", timeout=10).json()
    assert card["tools"] == "generic"  # SmolLM2's template knows no tools
