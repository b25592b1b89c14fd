"""Tool calling on the OpenAI wire, through upstream providers, with the official openai client.

A front locopilot with no models of its own routes to an Ollama stand-in (``ollama``)
and to a second locopilot (``peer``) whose upstream is the scripted OpenAI-compatible
fault upstream (``cloud``): tool calls made by the upstream cross two locopilots, in
OpenAI's wire form each way. The embedded engine's own tool calling is tested with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from locopilot.gateway.metrics import RequestMetrics
from locopilot.gateway.usage import Outcome
from tests.conftest import SMOL, Server, start_server
from tests.fakes.fault_upstream import FaultUpstream
from tests.fakes.ollama import OllamaStandIn

OLLAMA_MODEL = "ollama:llama3.2:1b"
PEER_MODEL = "peer:fault-small"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def history(call_id: str = "call_1", arguments: str = '{"city": "Paris"}') -> list[dict[str, Any]]:
    """A conversation in which the model called get_weather and the tool answered."""
    return [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "11 degrees"},
    ]


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaStandIn]:
    with OllamaStandIn(models=["llama3.2:1b"]) as stand_in:
        yield stand_in


@pytest.fixture(scope="module")
def cloud() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream().start()
    yield upstream
    upstream.stop()


def upstreams(*configs: dict[str, object]) -> dict[str, str]:
    return {"LOCOPILOT_UPSTREAMS": json.dumps(list(configs))}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, cloud: FaultUpstream) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory, {}, upstreams({"name": "cloud", "url": cloud.url, "models": list(FaultUpstream.MODELS)})
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, peer: Server, ollama: OllamaStandIn) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory,
        {},
        upstreams(
            {"name": "peer", "url": f"{peer.url}/v1", "locality": "local", "priority": 10},
            {"name": "ollama", "kind": "ollama", "url": ollama.url, "locality": "local", "priority": 20},
        ),
    )
    yield running
    running.stop()


@pytest.fixture
def client(front: Server) -> openai.OpenAI:
    return front.client()


@pytest.fixture(autouse=True)
def fresh_fakes(request: pytest.FixtureRequest) -> None:
    """Each test starts from the fakes' default answers and empty records."""
    for name in ("ollama", "cloud"):
        if name in request.fixturenames:
            fake = request.getfixturevalue(name)
            fake.requests.clear()
            if isinstance(fake, OllamaStandIn):
                fake.call_tools, fake.call_ids = [], True
            else:
                fake.calls = 1


def last_chat_body(cloud: FaultUpstream) -> dict[str, Any]:
    body: dict[str, Any] = [r for r in cloud.requests if r.path == "/v1/chat/completions"][-1].body
    return body


def streamed(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))


def call_deltas(chunks: list[Any]) -> list[Any]:
    return [call for c in chunks for choice in c.choices for call in choice.delta.tool_calls or []]


# Through Ollama (/api/chat with tools, translated both ways)


def test_ollama_tool_call_whole(client: openai.OpenAI, ollama: OllamaStandIn) -> None:
    reply = client.chat.completions.create(model=OLLAMA_MODEL, messages=ASK, tools=[WEATHER, TIME])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    (body,) = ollama.bodies("/api/chat")
    assert body["tools"] == [
        {"type": "function", "function": {**WEATHER["function"]}},  # type: ignore[dict-item]
        {"type": "function", "function": {**TIME["function"]}},  # type: ignore[dict-item]
    ]


def test_ollama_tool_calls_streamed_as_openai_does(client: openai.OpenAI, ollama: OllamaStandIn) -> None:
    ollama.call_tools = ["get_weather", "get_time"]
    chunks = streamed(client, model=OLLAMA_MODEL, messages=ASK, tools=[WEATHER, TIME])
    calls = call_deltas(chunks)
    # Each call: a first piece with index, id, type and name (empty arguments), then its arguments.
    assert [(c.index, c.type, c.function.name, c.function.arguments) for c in calls[::2]] == [
        (0, "function", "get_weather", ""),
        (1, "function", "get_time", ""),
    ]
    assert all(c.id.startswith("call_") for c in calls[::2])
    assert [(c.index, c.id, c.type, c.function.name) for c in calls[1::2]] == [
        (0, None, None, None),
        (1, None, None, None),
    ]
    assert [json.loads(c.function.arguments) for c in calls[1::2]] == [{"city": "Paris", "days": 3}, {"zone": "UTC"}]
    finishes = [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 15


def test_ollama_calls_without_ids_get_ids(client: openai.OpenAI, ollama: OllamaStandIn) -> None:
    ollama.call_ids = False
    reply = client.chat.completions.create(model=OLLAMA_MODEL, messages=ASK, tools=[WEATHER])
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.id.startswith("call_") and len(call.id) > len("call_")


def test_ollama_round_trip_with_tool_result(client: openai.OpenAI, ollama: OllamaStandIn) -> None:
    first = client.chat.completions.create(model=OLLAMA_MODEL, messages=ASK, tools=[WEATHER])
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    messages = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "11 degrees"},
    ]
    reply = client.chat.completions.create(model=OLLAMA_MODEL, messages=messages, tools=[WEATHER])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "The tool get_weather said: 11 degrees"
    sent = list(ollama.bodies("/api/chat"))[-1]["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": call.id, "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}],
    }
    assert sent[2] == {"role": "tool", "content": "11 degrees", "tool_name": "get_weather", "tool_call_id": call.id}


def test_ollama_tool_choice(client: openai.OpenAI, ollama: OllamaStandIn) -> None:
    """Ollama has no tool_choice: a named function is offered alone, none offers no tools."""
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = client.chat.completions.create(model=OLLAMA_MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named)
    assert [call.function.name for call in reply.choices[0].message.tool_calls or []] == ["get_time"]
    none = client.chat.completions.create(model=OLLAMA_MODEL, messages=ASK, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason == "stop"
    bodies = list(ollama.bodies("/api/chat"))
    assert [tool["function"]["name"] for tool in bodies[0]["tools"]] == ["get_time"]
    assert "tools" not in bodies[1]


def test_ollama_takes_images_inline(client: openai.OpenAI, ollama: OllamaStandIn) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    content = [{"type": "text", "text": "What is this?"}, image]
    client.chat.completions.create(model=OLLAMA_MODEL, messages=[{"role": "user", "content": content}])
    (body,) = ollama.bodies("/api/chat")
    assert body["messages"] == [{"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]}]
    linked = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=OLLAMA_MODEL, messages=[{"role": "user", "content": [linked]}])
    assert refused.value.body["param"] == "messages[0].content"  # type: ignore[index]


# Through a second locopilot to an OpenAI-compatible upstream


def test_peer_tool_call_whole(client: openai.OpenAI, cloud: FaultUpstream) -> None:
    reply = client.chat.completions.create(
        model=PEER_MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert (call.id, call.function.name) == ("call_fault0", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    # What reached the upstream behind the second locopilot, in OpenAI's form.
    body = last_chat_body(cloud)
    assert body["tools"] == [WEATHER, TIME]
    assert body["tool_choice"] == "required"
    assert body["parallel_tool_calls"] is False


def test_peer_tool_calls_streamed(client: openai.OpenAI, cloud: FaultUpstream) -> None:
    cloud.calls = 2
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = streamed(client, model=PEER_MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named)
    calls = call_deltas(chunks)
    openings = [c for c in calls if c.id is not None]
    assert [(c.index, c.id, c.type, c.function.name, c.function.arguments) for c in openings] == [
        (0, "call_fault0", "function", "get_weather", ""),
        (1, "call_fault1", "function", "get_weather", ""),
    ]
    pieces = [c for c in calls if c.id is None]
    assert all(c.type is None and c.function.name is None for c in pieces)
    for index in (0, 1):
        arguments = "".join(c.function.arguments for c in pieces if c.index == index)
        assert json.loads(arguments) == {"city": "Paris", "days": 3}
    assert [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == FaultUpstream.PROMPT_TOKENS
    assert last_chat_body(cloud)["tool_choice"] == named


def test_peer_round_trip_with_tool_result(client: openai.OpenAI, cloud: FaultUpstream) -> None:
    reply = client.chat.completions.create(model=PEER_MODEL, messages=history(), tools=[WEATHER])
    assert reply.choices[0].message.content == "The tool said: 11 degrees"
    assert reply.choices[0].finish_reason == "stop"
    sent = last_chat_body(cloud)["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    assert sent[2] == {"role": "tool", "content": "11 degrees", "tool_call_id": "call_1"}


def test_peer_passes_images_and_token_prompts(client: openai.OpenAI, cloud: FaultUpstream) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png", "detail": "low"}}
    content = [{"type": "text", "text": "What is this?"}, image]
    client.chat.completions.create(model=PEER_MODEL, messages=[{"role": "user", "content": content}])
    assert last_chat_body(cloud)["messages"] == [{"role": "user", "content": content}]
    completion = client.completions.create(model=PEER_MODEL, prompt=[1, 2, 3], max_tokens=4)
    assert completion.choices[0].text == "".join(FaultUpstream.WORDS)
    completion = client.completions.create(model=PEER_MODEL, prompt=[[4, 5]], max_tokens=4)
    prompts = [r.body["prompt"] for r in cloud.requests if r.path == "/v1/completions"]
    assert prompts == [[1, 2, 3], [4, 5]]


# Bad input: a 400 naming the field, before any work


def refused(client: openai.OpenAI, **kwargs: Any) -> tuple[str | None, str]:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=PEER_MODEL, **kwargs)
    body: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    return body["param"], body["message"]


def tool(name: str, parameters: object = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


DEEP: dict[str, Any] = {"type": "object"}
for _ in range(26):  # 53 levels: past the schema bound (48), within the body bound (64)
    DEEP = {"type": "object", "properties": {"x": DEEP}}


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name", "name"),
        ({"tools": [tool("get weather")]}, "tools[0].function.name", "Invalid tool name"),
        ({"tools": [tool("x" * 65)]}, "tools[0].function.name", "Invalid tool name"),
        ({"tools": [WEATHER, TIME, WEATHER]}, "tools[2].function.name", "declared twice"),
        ({"tools": [tool("f", {"type": "string"})]}, "tools[0].function.parameters", '"type": "object"'),
        ({"tools": [tool("f", {"properties": {"a": {}}})]}, "tools[0].function.parameters", '"type": "object"'),
        (
            {"tools": [tool("f", {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**8}}})]},
            "tools[0].function.parameters",
            "exceeds",
        ),
        ({"tools": [tool("f", DEEP)]}, "tools[0].function.parameters", "nested"),
        (
            {"tools": [tool("f", {"type": "object", "description": "x" * 70_000})]},
            "tools[0].function.parameters",
            "larger",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice", "no tools"),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
            "messages[1].tool_call_id",
            "call_9",
        ),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id", "tool_call_id"),
        ({"messages": history(arguments="[1, 2]")}, "messages[1].tool_calls[0].function.arguments", "object"),
        ({"messages": history(arguments='{"city": ')}, "messages[1].tool_calls[0].function.arguments", "object"),
        (
            {"messages": [*history()[:2], {**history()[2], "tool_call_id": "call_2"}]},
            "messages[2].tool_call_id",
            "call_2",
        ),
    ],
)
def test_bad_tool_input_is_a_400_with_param(
    client: openai.OpenAI, cloud: FaultUpstream, kwargs: dict[str, Any], param: str, says: str
) -> None:
    found, message = refused(client, **{"messages": ASK, **kwargs})
    assert found == param
    assert says in message
    assert not [r for r in cloud.requests if r.method == "POST"]  # refused before any work


def test_too_many_tools(client: openai.OpenAI) -> None:
    param, message = refused(client, messages=ASK, tools=[tool(f"f{i}") for i in range(129)])
    assert param == "tools"
    assert "128" in message


# The embedded engine


def test_embedded_refuses_images_and_token_prompts(server: Server) -> None:
    client = server.client()
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": [image]}])
    assert caught.value.body["param"] == "messages[0].content"  # type: ignore[index]
    assert "images" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SMOL, prompt=[1, 2, 3])
    assert caught.value.body["param"] == "prompt"  # type: ignore[index]
    assert "token ids" in caught.value.body["message"]  # type: ignore[index]


def test_tool_call_through_second_locopilot_from_its_engine(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    """A front routes to a second locopilot whose embedded SmolLM2 must call the tool."""
    engine = start_server(tmp_path_factory, {SMOL: smollm2_path})
    try:
        # Loaded beforehand, and a long upstream timeout: a cold load on a busy machine can outlast the default.
        engine.client().chat.completions.create(model=SMOL, messages=ASK, max_tokens=1)
        settings = {**upstreams({"name": "engine", "url": f"{engine.url}/v1"}), "LOCOPILOT_UPSTREAM_TIMEOUT": "600"}
        front = start_server(tmp_path_factory, {}, settings)
        try:
            client = front.client().with_options(timeout=600)
            forced: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required", "temperature": 0, "max_tokens": 64}
            reply = client.chat.completions.create(model=f"engine:{SMOL}", messages=ASK, **forced)
            assert reply.choices[0].finish_reason == "tool_calls"
            (call,) = reply.choices[0].message.tool_calls or []
            assert call.function.name == "get_weather"
            assert isinstance(json.loads(call.function.arguments)["city"], str)
            chunks = streamed(client, model=f"engine:{SMOL}", messages=ASK, **forced)
            arguments = "".join(c.function.arguments or "" for c in call_deltas(chunks))
            assert isinstance(json.loads(arguments)["city"], str)
            assert [choice.finish_reason for c in chunks for choice in c.choices if choice.finish_reason] == [
                "tool_calls"
            ]
        finally:
            front.stop()
    finally:
        engine.stop()


# Metrics


def test_tool_parse_failures_are_counted_per_model() -> None:
    metrics = RequestMetrics(lambda provider, model: model == "known")
    for model, failures in (("known", 2), ("known", 1), ("made-up", 4), ("known", 0)):
        outcome = Outcome("r", "chat.completions", model, provider="embedded")
        outcome.tool_parse_failures = failures
        metrics.observe(outcome, 200, 0.1)
    (family,) = [f for f in metrics.collect() if f.name == "locopilot_tool_call_parse_failures"]
    assert {s.labels["model"]: s.value for s in family.samples if s.name.endswith("_total")} == {
        "known": 3,
        "other": 4,
    }


def test_metrics_endpoint_lists_the_counter(front: Server) -> None:
    text = httpx.get(f"{front.url}/metrics", timeout=10).text
    assert "# TYPE locopilot_tool_call_parse_failures_total counter" in text


# The Ollama and Anthropic fronts: tools through the same translations


def test_ollama_front_tool_calls_through_each_upstream(front: Server, ollama: OllamaStandIn) -> None:
    """The official ollama client's /api/chat with tools: calls come back with object arguments,
    whole and streamed, from an Ollama upstream and from an OpenAI-compatible one."""
    import ollama as ollama_client

    tools = [WEATHER, TIME]
    with ollama_client.Client(host=front.url) as client:
        for model in (OLLAMA_MODEL, PEER_MODEL):
            reply = client.chat(model=model, messages=ASK, tools=tools)
            (call,) = reply.message.tool_calls or []
            assert call.function.name == "get_weather"
            assert call.function.arguments["city"] == "Paris"
            streamed_calls = [
                c
                for part in client.chat(model=model, messages=ASK, tools=tools, stream=True)
                for c in part.message.tool_calls or []
            ]
            assert [c.function.name for c in streamed_calls] == ["get_weather"]
        # A tool result goes back to the upstream as a tool message.
        answered = client.chat(
            model=OLLAMA_MODEL,
            messages=[
                *ASK,
                {"role": "assistant", "content": "", "tool_calls": [reply_call(call)]},
                {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"},
            ],
            tools=tools,
        )
    assert answered.message.content == "The tool get_weather said: 11 degrees"


def reply_call(call: Any) -> dict[str, Any]:
    return {"function": {"name": call.function.name, "arguments": dict(call.function.arguments)}}


def test_anthropic_tool_use_through_the_ollama_upstream(front: Server, ollama: OllamaStandIn) -> None:
    """The official anthropic client's tool use, answered by an Ollama upstream."""
    import anthropic

    with anthropic.Anthropic(base_url=front.url, api_key="unused") as client:
        message = client.messages.create(
            model=OLLAMA_MODEL,
            max_tokens=64,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],  # type: ignore[index]
            tool_choice={"type": "any"},
        )
    assert message.stop_reason == "tool_use"
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] == "Paris"  # type: ignore[index]
