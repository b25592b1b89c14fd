"""Anthropic's Messages API through the real server, driven by the official ``anthropic`` client.

``local``: a server with SmolLM2 and a model alias (``claude-*`` → SmolLM2), prompts and
replies kept in its request log. ``front``: a server with no model of its own, in front of
``local`` as an OpenAI-compatible upstream (``peer``) and of a scripted fault upstream
(``flaky``, remote): the same API routed to a second locopilot.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import apsw
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SMOL, Server, free_port, start_server
from tests.fakes.fault_upstream import FaultUpstream

QUESTION = "Which city is the capital of France?"
GREEDY = {"temperature": 0.0}


def client_for(server: Server, **kwargs: Any) -> anthropic.Anthropic:
    """The official client as a user points it at locopilot: base_url without /v1, any api_key."""
    options: dict[str, Any] = {"api_key": "unused", "max_retries": 0, "timeout": 120, **kwargs}
    return anthropic.Anthropic(base_url=server.url, **options)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    env = {"LOCOPILOT_MODEL_ALIASES": json.dumps({"claude-*": SMOL}), "LOCOPILOT_LOG_PROMPTS": "true"}
    running = start_server(tmp_path_factory, {SMOL: smollm2_path}, env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def flaky() -> Iterator[FaultUpstream]:
    upstream = FaultUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, local: Server, flaky: FaultUpstream) -> Iterator[Server]:
    upstreams = [
        {"name": "peer", "url": f"{local.url}/v1", "locality": "local", "priority": 10},
        {"name": "flaky", "url": flaky.url, "locality": "remote", "priority": 20},
        {"name": "gone", "url": f"http://127.0.0.1:{free_port()}/v1", "locality": "local", "priority": 30},
    ]
    running = start_server(tmp_path_factory, {}, {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams)})
    yield running
    running.stop()


@pytest.fixture
def claude(local: Server) -> Iterator[anthropic.Anthropic]:
    with client_for(local) as client:
        yield client


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def logged(server: Server, request_id: str) -> dict[str, Any]:
    conn = apsw.Connection(str(server.db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(5000)
        cursor = conn.execute(
            "SELECT endpoint, model, provider, tokens_in, tokens_out, prompt, completion, http_status, routing "
            "FROM inference_logs WHERE request_id = ?",
            (request_id,),
        )
        names = [d[0] for d in cursor.getdescription()]
        rows = [dict(zip(names, row, strict=True)) for row in cursor]
    finally:
        conn.close()
    assert len(rows) == 1, rows
    return rows[0]


# The embedded engine


def test_create_answers_a_message(claude: anthropic.Anthropic, local: Server) -> None:
    raw = claude.messages.with_raw_response.create(
        model=SMOL, max_tokens=24, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == SMOL
    assert "Paris" in text_of(message)
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.stop_sequence is None
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 5
    assert message.usage.output_tokens > 0
    assert raw.headers["x-locopilot-provider"] == "embedded"
    row = logged(local, raw.headers["x-request-id"])
    assert row["endpoint"] == "messages" and row["provider"] == "embedded" and row["http_status"] == 200
    assert row["tokens_out"] == message.usage.output_tokens
    metrics = text_string_to_metric_families(httpx.get(f"{local.url}/metrics", timeout=10).text)
    served = {"route": "/v1/messages", "model": SMOL, "provider": "embedded", "status": "200"}
    counted = [
        s
        for f in metrics
        for s in f.samples
        if s.name == "locopilot_requests_total" and served.items() <= s.labels.items()
    ]
    assert counted and counted[0].value >= 1


def test_claude_code_style_request(claude: anthropic.Anthropic) -> None:
    """As a coding agent sends it: ``?beta=true``, beta headers, cache_control everywhere, fields we do not know."""
    message = claude.messages.create(
        model="claude-haiku-4-5",
        max_tokens=2,
        system=[{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}
        ],
        tools=[{**WEATHER, "cache_control": {"type": "ephemeral"}}],  # type: ignore[list-item]
        extra_query={"beta": "true"},
        extra_headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
        extra_body={"context_management": {"edits": []}, "output_config": {"effort": "low"}, "service_tier": "auto"},
    )
    assert message.usage.output_tokens > 0


def test_block_content_and_system_reach_the_model(claude: anthropic.Anthropic, local: Server) -> None:
    raw = claude.messages.with_raw_response.create(
        model=SMOL,
        max_tokens=4,
        system=[{"type": "text", "text": "You are a geography tutor.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "x", "signature": "s"},
                    {"type": "text", "text": "Paris."},
                ],
            },
            {"role": "user", "content": "And of Italy?"},
        ],
        extra_body={"thinking": {"type": "disabled"}, "metadata": {"user_id": "u-1"}},
    )
    assert raw.parse().usage.output_tokens > 0
    prompt = json.loads(logged(local, raw.headers["x-request-id"])["prompt"])
    assert prompt == [
        {"role": "system", "content": "You are a geography tutor."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]


def test_max_tokens_stop(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=SMOL, max_tokens=3, messages=[{"role": "user", "content": "Count from one to twenty in words."}]
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


@pytest.mark.parametrize("where", ["embedded", "peer"])
def test_stop_sequences_say_which_one_matched(
    claude: anthropic.Anthropic, routed: anthropic.Anthropic, where: str
) -> None:
    """Through a second locopilot too: its OpenAI answer names the stop string as vLLM does (``stop_reason``)."""
    client, model = (claude, SMOL) if where == "embedded" else (routed, f"peer:{SMOL}")
    ask = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": QUESTION}], "extra_body": GREEDY}
    whole = text_of(client.messages.create(**ask))
    words = whole.split()
    assert len(words) >= 4, whole
    stop = " " + words[2]
    cut = whole.index(stop)
    message = client.messages.create(**ask, stop_sequences=["never-said-zzz", stop])
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == stop
    assert text_of(message) == whole[:cut]
    with client.messages.stream(**ask, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, text_of(final)) == ("stop_sequence", stop, whole[:cut])


def test_streaming_helper(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=SMOL, max_tokens=24, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in streamed
    assert text_of(final) == streamed
    assert final.id.startswith("msg_")
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > 5


def test_stream_events_in_anthropic_order(local: Server) -> None:
    body = {"model": SMOL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    with httpx.stream("POST", f"{local.url}/v1/messages", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [p["type"] for p in payloads] == names
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert payloads[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert payloads[-2]["usage"]["output_tokens"] == 5


def test_count_tokens_is_the_prompt_the_model_sees(claude: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    counted = claude.messages.count_tokens(model=SMOL, messages=messages).input_tokens
    usage = claude.messages.create(model=SMOL, max_tokens=1, messages=messages).usage
    assert counted == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    # SmolLM2's template adds a system prompt of its own (17 tokens) when there is none.
    system = "Answer in one word, and check the spelling of every city name twice. " * 4
    with_system = claude.messages.count_tokens(model=SMOL, system=system, messages=messages)
    assert with_system.input_tokens > counted + 20


def test_model_aliases_and_anthropic_model_list(claude: anthropic.Anthropic, local: Server) -> None:
    raw = claude.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=2, messages=[{"role": "user", "content": QUESTION}]
    )
    assert raw.parse().model == "claude-sonnet-4-5"
    assert raw.headers["x-locopilot-model"] == SMOL
    routing = json.loads(logged(local, raw.headers["x-request-id"])["routing"])
    assert (routing["requested"], routing["alias_of"]) == (SMOL, "claude-sonnet-4-5")
    page = claude.models.list()
    assert [model.id for model in page.data] == [SMOL]
    assert page.data[0].type == "model" and page.data[0].display_name == SMOL
    assert page.has_more is False and page.first_id == SMOL and page.last_id == SMOL
    assert claude.models.retrieve(SMOL).id == SMOL


def test_errors_in_anthropic_shape(claude: anthropic.Anthropic, local: Server) -> None:
    hi: list[Any] = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.NotFoundError) as not_found:
        claude.messages.create(model="no-such-model", max_tokens=2, messages=hi)
    assert not_found.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model 'no-such-model' does not exist"},
    }
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=SMOL, max_tokens=0, messages=hi)
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in bad.value.message
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        claude.messages.create(model=SMOL, max_tokens=2, messages=hi, extra_body={"temperature": 1.5})
    with pytest.raises(anthropic.BadRequestError, match="tool_use_id"):
        claude.messages.create(
            model=SMOL,
            max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}],
        )
    result = {"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}
    with pytest.raises(anthropic.BadRequestError, match="may not hold a 'tool_result' block"):
        claude.messages.create(model=SMOL, max_tokens=2, messages=[*hi, {"role": "assistant", "content": [result]}])
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    with pytest.raises(anthropic.BadRequestError, match="document"):
        claude.messages.create(model=SMOL, max_tokens=2, messages=[{"role": "user", "content": [document]}])
    with pytest.raises(anthropic.BadRequestError, match="Server tools"):
        claude.messages.create(
            model=SMOL, max_tokens=2, messages=hi, tools=[{"type": "web_search_20250305", "name": "web_search"}]
        )
    # A body over LOCOPILOT_MAX_BODY_BYTES (16 MiB by default) is refused while it is read.
    with pytest.raises(anthropic.APIStatusError) as too_large:
        claude.messages.create(model=SMOL, max_tokens=2, messages=[{"role": "user", "content": "x" * (17 << 20)}])
    assert too_large.value.status_code == 413
    assert too_large.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    # Not JSON at all.
    response = httpx.post(f"{local.url}/v1/messages", content=b"{not json", timeout=10)
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


# Routed to a second locopilot, and to upstreams that fail


@pytest.fixture
def routed(front: Server) -> Iterator[anthropic.Anthropic]:
    with client_for(front) as client:
        yield client


def test_routed_to_a_second_locopilot(routed: anthropic.Anthropic) -> None:
    raw = routed.messages.with_raw_response.create(
        model=f"peer:{SMOL}", max_tokens=24, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
    )
    message = raw.parse()
    assert raw.headers["x-locopilot-provider"] == "peer"
    assert "Paris" in text_of(message)
    assert message.usage.output_tokens > 0
    with routed.messages.stream(
        model=SMOL, max_tokens=3, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed and text_of(final) == streamed
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 3


def test_count_tokens_for_an_upstream_model_is_refused(routed: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="embedded engine"):
        routed.messages.count_tokens(model="flaky:fault-small", messages=[{"role": "user", "content": "hi"}])


def test_an_unreachable_upstream_is_overloaded(routed: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        routed.messages.create(model="gone:some-model", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_an_error_after_the_first_byte_is_an_error_event(routed: anthropic.Anthropic, flaky: FaultUpstream) -> None:
    flaky.mode = "error_event"
    try:
        with (
            pytest.raises(anthropic.APIStatusError) as failed,
            routed.messages.stream(
                model="flaky:fault-small", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            ) as stream,
        ):
            for _ in stream.text_stream:
                pass
    finally:
        flaky.mode = "ok"
    assert failed.value.body["type"] == "error"  # type: ignore[index]
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]


# Tool use

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_a_tool_result_round_trip_reaches_the_model_as_tool_messages(
    claude: anthropic.Anthropic, local: Server
) -> None:
    raw = claude.messages.with_raw_response.create(
        model=SMOL,
        max_tokens=4,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
    )
    assert raw.parse().usage.output_tokens > 0
    prompt = json.loads(logged(local, raw.headers["x-request-id"])["prompt"])
    assert prompt == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [{"id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "Thanks."},
    ]


def test_tool_checks_are_400s_with_the_field(claude: anthropic.Anthropic) -> None:
    hi: list[Any] = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{**WEATHER, "name": "bad name"}]}, "tools[0].name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
        ({"tools": [{**WEATHER, "input_schema": {"type": "string"}}]}, "tools[0].input_schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}}, "tool_choice"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ]
    for extra, param in cases:
        with pytest.raises(anthropic.BadRequestError) as bad:
            claude.messages.create(model=SMOL, max_tokens=2, messages=hi, **extra)
        assert bad.value.body["error"]["type"] == "invalid_request_error", extra  # type: ignore[index]
        assert param in bad.value.message, (param, bad.value.message)


def test_tool_use_blocks_stream_as_the_sdk_accumulates_them() -> None:
    """The formatter's bytes for a reply with text and two calls, read by the SDK's own SSE
    decoder and stream accumulator (the parts a live stream goes through)."""
    from anthropic._models import construct_type
    from anthropic._streaming import SSEDecoder
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent

    from locopilot.api.anthropic import MessagesFormatter
    from locopilot.gateway.streaming import Reply
    from locopilot.providers.base import Finish, TextDelta, ToolCallDelta

    events: list[TextDelta | ToolCallDelta] = [
        TextDelta("Checking.", 2),
        ToolCallDelta(call=0, id="call_a", name="get_weather", arguments='{"ci'),
        ToolCallDelta(call=0, arguments='ty": "Paris"}', tokens=3),
        ToolCallDelta(call=1, id="call_b", name="get_weather", arguments='{"city": "Rome"}', tokens=4),
    ]
    finish = Finish("tool_calls", 30, 9, 10)
    formatter = MessagesFormatter("msg-abc", "m", [])
    body = formatter.opening() + b"".join(formatter.event(e) for e in events) + formatter.closing(finish)
    snapshot = None
    buffers: dict[int, bytes] = {}
    for sse in SSEDecoder().iter_bytes(iter([body])):
        if sse.event == "ping":
            continue
        event = construct_type(type_=RawMessageStreamEvent, value=sse.json())  # type: ignore[arg-type]
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    streamed = snapshot.to_dict()
    assert streamed.pop("stop_details") is None  # set by the SDK's accumulator from message_delta
    reply = Reply()
    for e in events:
        reply.add(e)
    reply.finish = finish
    whole = json.loads(msgspec_json(MessagesFormatter("msg-abc", "m", []).whole(reply)))
    assert streamed == whole
    assert whole["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    assert whole["stop_reason"] == "tool_use"
    assert whole["usage"] == {
        "input_tokens": 20,
        "output_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 10,
    }


def msgspec_json(value: Any) -> bytes:
    import msgspec

    return msgspec.json.encode(value)


@pytest.mark.parametrize("where", ["embedded", "peer"])
def test_tool_use_with_any_and_a_tool_result_round_trip(
    claude: anthropic.Anthropic, routed: anthropic.Anthropic, where: str
) -> None:
    # Grammar-constrained sampling is slow on a loaded 2-core machine (24 tokens took 110-140 s at load 15).
    client = (claude if where == "embedded" else routed).with_options(timeout=600)
    model = SMOL if where == "embedded" else f"peer:{SMOL}"
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    # Greedy, with room: sampled at the default temperature, the call's JSON once ran past 64 tokens.
    called = client.messages.create(
        model=model,
        max_tokens=256,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=ask,  # type: ignore[list-item]
        extra_body={"temperature": 0},
    )
    assert called.stop_reason == "tool_use"
    uses = [block for block in called.content if block.type == "tool_use"]
    assert uses and uses[0].name == "get_weather"
    assert isinstance(uses[0].input, dict) and isinstance(uses[0].input.get("city"), str)
    results: list[Any] = [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"} for use in uses]
    with client.messages.stream(
        model=model,
        max_tokens=8,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[*ask, {"role": "assistant", "content": called.content}, {"role": "user", "content": results}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.usage.output_tokens > 0


PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_images_reach_an_upstream_that_can_see_as_image_url_parts(
    routed: anthropic.Anthropic, flaky: FaultUpstream
) -> None:
    """Routed to an OpenAI-compatible upstream, base64 and URL image blocks arrive as OpenAI's
    ``image_url`` parts (a data: URL for base64) beside the text, and the answer comes back."""
    flaky.requests.clear()
    content: list[Any] = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "text", "text": "What is this?"},
    ]
    message = routed.messages.create(
        model="flaky:fault-small", max_tokens=8, messages=[{"role": "user", "content": content}]
    )
    assert text_of(message) == "".join(FaultUpstream.WORDS)
    (sent,) = [r.body for r in flaky.requests if r.path == "/v1/chat/completions"]
    (user,) = sent["messages"]
    assert user["role"] == "user"
    assert {"type": "text", "text": "What is this?"} in user["content"]
    urls = [part["image_url"]["url"] for part in user["content"] if part["type"] == "image_url"]
    assert urls == [f"data:image/png;base64,{PIXEL}", "https://example.com/cat.png"]


def test_an_image_is_refused_by_a_model_that_cannot_see(claude: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}}
    content: list[Any] = [image, {"type": "text", "text": "What is this?"}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=SMOL, max_tokens=2, messages=[{"role": "user", "content": content}])
    assert refused.value.status_code == 400
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "cannot read images" in refused.value.body["error"]["message"]  # type: ignore[index]


def test_an_image_that_is_not_base64_is_refused(claude: anthropic.Anthropic) -> None:
    bad = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}
    with pytest.raises(anthropic.BadRequestError, match="base64"):
        claude.messages.create(model=SMOL, max_tokens=2, messages=[{"role": "user", "content": [bad]}])
