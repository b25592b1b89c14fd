"""The Responses API (``/v1/responses``), driven with the official openai client against a real server.

One keyed server serves SmolLM2 (embedded) and a scripted OpenAI-compatible upstream; it logs
prompts, so a test can read the conversation a chained response was generated from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from locopilot.store import responses as stored
from locopilot.store.db import Database
from tests.conftest import SMOL, Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import ADMIN_KEY, Key, cloud_server, create_key
from tests.test_api import wait_for_log_row

CAPITAL = "Which city is the capital of France?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, upstream: FaultUpstream) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("responses")
    with cloud_server(root, {SMOL: smollm2_path}, upstream, LOCOPILOT_LOG_PROMPTS="true") as running:
        yield running


@pytest.fixture(scope="module")
def alice(server: Server) -> Key:
    return create_key(server, name="alice")


@pytest.fixture(scope="module")
def bob(server: Server) -> Key:
    return create_key(server, name="bob")


def client_for(server: Server, key: Key | str) -> openai.OpenAI:
    secret = key if isinstance(key, str) else key.secret
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0, timeout=120)
    server.clients.append(client)
    return client


@pytest.fixture
def client(server: Server, alice: Key) -> openai.OpenAI:
    return client_for(server, alice)


def logged_messages(server: Server, request_id: str) -> list[dict[str, Any]]:
    """The messages the model was given, from the request log (the server logs prompts)."""
    row = wait_for_log_row(server, request_id)
    assert row["endpoint"] == "responses"
    prompt = row["prompt"]
    assert isinstance(prompt, str)
    messages: list[dict[str, Any]] = json.loads(prompt)
    return messages


def test_text_input_answers_with_a_stored_response(server: Server, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=SMOL, input=CAPITAL, temperature=0, max_output_tokens=24, metadata={"case": "text"}
    )
    response = raw.parse()
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.object == "response"
    assert "Paris" in response.output_text
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert response.usage is not None
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.metadata == {"case": "text"}
    assert response.temperature == 0 and response.max_output_tokens == 24
    assert raw.headers["x-locopilot-provider"] == "embedded"
    assert logged_messages(server, raw.headers["x-request-id"]) == [{"role": "user", "content": CAPITAL}]

    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()


def test_items_input_and_instructions(server: Server, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=SMOL,
        instructions="Answer in one short sentence.",
        input=[
            {"role": "developer", "content": "You are a geography teacher."},
            {"type": "reasoning", "id": "rs_earlier", "summary": []},  # accepted and ignored
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": CAPITAL}]},
        ],
        temperature=0,
        max_output_tokens=8,
    )
    response = raw.parse()
    assert response.output_text
    assert response.instructions == "Answer in one short sentence."
    assert logged_messages(server, raw.headers["x-request-id"]) == [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "system", "content": "You are a geography teacher."},
        {"role": "user", "content": CAPITAL},
    ]
    items = client.responses.input_items.list(response.id, order="asc")
    assert [item.type for item in items.data] == ["message", "reasoning", "message"]
    assert all(item.id for item in items.data)


def test_streaming_follows_the_documented_event_sequence(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=SMOL, input=CAPITAL, temperature=0, max_output_tokens=24)
    with client.responses.stream(model=SMOL, input=CAPITAL, temperature=0, max_output_tokens=24) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert final.status == "completed"
    # The streamed response was stored as the stream's last event showed it.
    kept = client.responses.retrieve(final.id)
    assert kept.output_text == final.output_text
    assert [item.id for item in kept.output] == [item.id for item in final.output]
    assert kept.usage == final.usage and kept.status == "completed"


def test_the_stream_has_event_lines(server: Server, alice: Key) -> None:
    body = {"model": SMOL, "input": CAPITAL, "stream": True, "max_output_tokens": 4, "store": False}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=alice.headers, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = reply.read().decode()
    blocks = [block for block in text.split("\n\n") if block]
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == event[7:]
    assert blocks[-1].startswith("event: response.incomplete")


def test_a_chain_continues_from_the_stored_conversation(server: Server, client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=SMOL,
        instructions="You are a helpful assistant.",
        input="My name is Ada and I live in Paris.",
        temperature=0,
        max_output_tokens=12,
    )
    raw = client.responses.with_raw_response.create(
        model=SMOL,
        instructions="You are a helpful assistant.",
        previous_response_id=first.id,
        input="What is my name?",
        temperature=0,
        max_output_tokens=12,
    )
    second = raw.parse()
    assert second.previous_response_id == first.id
    # The model saw the first turn (its question and answer) before the new one...
    assert logged_messages(server, raw.headers["x-request-id"]) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is Ada and I live in Paris."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    # ...and the engine's prompt cache held it.
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens

    # The items it was generated from, newest first by default, and paged.
    items = client.responses.input_items.list(second.id)
    texts = [item.content[0].text for item in items.data]  # type: ignore[union-attr]
    assert texts == ["What is my name?", first.output_text, "My name is Ada and I live in Paris."]
    page = client.responses.input_items.list(second.id, limit=1, order="asc")
    assert len(page.data) == 1 and page.has_more
    assert [item.id for item in page] == [item.id for item in reversed(items.data)]  # auto-paging


def test_another_key_cannot_see_a_response(server: Server, client: openai.OpenAI, bob: Key) -> None:
    mine = client.responses.create(model=SMOL, input="Hello", max_output_tokens=4)
    theirs = client_for(server, bob)
    for attempt in (
        lambda: theirs.responses.retrieve(mine.id),
        lambda: theirs.responses.input_items.list(mine.id),
        lambda: theirs.responses.delete(mine.id),
        lambda: theirs.responses.cancel(mine.id),
        lambda: theirs.responses.create(model=SMOL, input="Hi", previous_response_id=mine.id),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert caught.value.status_code == 404
        assert mine.id in caught.value.message
    # The admin sees every key's responses.
    assert client_for(server, ADMIN_KEY).responses.retrieve(mine.id).id == mine.id
    assert client.responses.retrieve(mine.id).id == mine.id


def test_unknown_ids_are_404_in_openai_shape(server: Server, alice: Key) -> None:
    response = httpx.get(f"{server.url}/v1/responses/resp_nope", headers=alice.headers, timeout=10)
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "Response with id 'resp_nope' not found.",
            "type": "invalid_request_error",
            "param": "response_id",
            "code": "response_not_found",
        }
    }


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model=SMOL, input="Hello", max_output_tokens=4, store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=SMOL, input="Hi", previous_response_id=response.id)


def test_delete_and_cancel(client: openai.OpenAI, server: Server, alice: Key) -> None:
    response = client.responses.create(model=SMOL, input="Hello", max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.cancel(response.id)
    assert caught.value.body == {
        "message": "Cannot cancel a synchronous response.",
        "type": "invalid_request_error",
        "param": "response_id",
        "code": None,
    }
    deleted = httpx.delete(f"{server.url}/v1/responses/{response.id}", headers=alice.headers, timeout=10)
    assert deleted.json() == {"id": response.id, "deleted": True, "object": "response"}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=SMOL, input="Tell me a long story about a cat.", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert response.usage is not None and response.usage.output_tokens == 3

    with client.responses.stream(model=SMOL, input="Tell me a long story.", max_output_tokens=3) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=SMOL,
        input=CAPITAL + " Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=48,
    )
    answer = json.loads(response.output_text)
    assert set(answer) == {"city", "country"}
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


def test_text_formats_reach_an_upstream_as_response_format(upstream: FaultUpstream, client: openai.OpenAI) -> None:
    client.responses.create(model="fault-small", input="Give me JSON.", text={"format": {"type": "json_object"}})
    assert upstream.requests[-1].body["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    client.responses.create(
        model="fault-small",
        input="Give me JSON.",
        text={"format": {"type": "json_schema", "name": "c", "schema": schema}},
    )
    sent = upstream.requests[-1].body["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}


@pytest.mark.parametrize("kind", ["web_search_preview", "file_search", "computer_use_preview", "code_interpreter"])
def test_built_in_tools_are_refused_by_name(client: openai.OpenAI, kind: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=SMOL, input="Search the web", tools=[{"type": kind}])  # type: ignore[list-item]
    assert f"'{kind}'" in caught.value.message
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "tools[0].type"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "computer_call_output", "call_id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": 7}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        ({"input": []}, "input"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"type": "item_reference", "id": "msg_nope"}]}, "input[0].id"),
        ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input[0].call_id"),
        (
            {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
            "tools[0].parameters",
        ),
        (
            {
                "input": "hi",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "function", "name": "g"},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_requests_name_the_field(server: Server, alice: Key, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{server.url}/v1/responses", json={"model": SMOL, **body}, headers=alice.headers, timeout=10)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


def test_item_references_name_stored_items(server: Server, client: openai.OpenAI) -> None:
    first = client.responses.create(model=SMOL, input="My name is Ada.", temperature=0, max_output_tokens=8)
    question = client.responses.input_items.list(first.id).data[0]
    raw = client.responses.with_raw_response.create(
        model=SMOL,
        input=[
            {"type": "item_reference", "id": question.id},
            {"type": "item_reference", "id": first.output[0].id},  # type: ignore[typeddict-item]
            {"role": "user", "content": "What is my name?"},
        ],
        max_output_tokens=4,
    )
    assert logged_messages(server, raw.headers["x-request-id"])[:2] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
    ]


def test_any_provider_serves_it(upstream: FaultUpstream, client: openai.OpenAI) -> None:
    response = client.responses.create(model="fault-small", input="Hello", instructions="Be brief.")
    assert response.output_text == "".join(upstream.WORDS)
    sent = upstream.requests[-1].body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    with client.responses.stream(model="fault-small", input="Hello") as stream:
        assert stream.get_final_response().output_text == "".join(upstream.WORDS)


def test_an_error_mid_stream_fails_the_response(upstream: FaultUpstream, server: Server, alice: Key) -> None:
    upstream.mode = "error_event"
    try:
        body = {"model": "fault-small", "input": "Hello", "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=alice.headers, timeout=30) as reply:
            assert reply.status_code == 200
            events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    finally:
        upstream.mode = "ok"
    assert [event["type"] for event in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "lost its GPU" in events[-2]["message"]
    # A failed response is not stored.
    assert httpx.get(f"{server.url}/v1/responses/{failed['id']}", headers=alice.headers).status_code == 404


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def test_a_function_call_round_trip_through_an_upstream(upstream: FaultUpstream, client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="fault-small", input="Weather in Paris?", tools=[WEATHER], tool_choice="required"
    )
    [call] = first.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.name == "get_weather" and call.call_id == "call_fault0" and call.id and call.id.startswith("fc_")
    assert set(json.loads(call.arguments)) == {"city"}
    sent = upstream.requests[-1].body
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_weather"]
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["parameters"]
    assert sent["tool_choice"] == "required"
    assert first.tools[0].name == "get_weather" and first.tool_choice == "required"

    # The call's result, continuing the stored response: the upstream sees the call and the result.
    second = client.responses.create(
        model="fault-small",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "22 C and sunny"}],
        tools=[WEATHER],
    )
    assert second.output_text == "The tool said: 22 C and sunny"
    *_, asked, answered = upstream.requests[-1].body["messages"]
    assert asked["role"] == "assistant"
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in asked["tool_calls"]] == [
        (call.call_id, "get_weather", call.arguments)
    ]
    assert answered["role"] == "tool" and answered["tool_call_id"] == call.call_id
    assert answered["content"] == "22 C and sunny"
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]


def test_a_streamed_function_call(upstream: FaultUpstream, client: openai.OpenAI) -> None:
    named = {"type": "function", "name": "get_weather"}
    with client.responses.stream(
        model="fault-small",
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice=named,  # type: ignore[arg-type]
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    [call] = final.output
    assert call.type == "function_call"
    pieces = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == call.arguments
    assert upstream.requests[-1].body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_a_chain_survives_a_restart(server: Server, alice: Key) -> None:
    client = client_for(server, alice)
    first = client.responses.create(model=SMOL, input="My name is Ada.", temperature=0, max_output_tokens=8)
    server.stop()
    server.start(path="/health")
    client = client_for(server, alice)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    raw = client.responses.with_raw_response.create(
        model=SMOL, previous_response_id=first.id, input="What is my name?", max_output_tokens=4
    )
    assert logged_messages(server, raw.headers["x-request-id"]) == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]


def test_retention_purges_old_responses_and_their_items(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "state.db")
    try:
        for response_id, created_at, previous in (("resp_old", 1000.0, None), ("resp_new", time.time(), "resp_old")):
            record = stored.StoredResponse(
                id=response_id,
                key_id=None,
                model="m",
                status="completed",
                previous_response_id=previous,
                created_at=created_at,
                body="{}",
            )
            item = json.dumps({"type": "message", "role": "user", "content": response_id, "id": f"msg_{response_id}"})
            db.submit(lambda conn, r=record, i=item: stored.insert(conn, r, [(f"msg_{r.id}", i)], [])).result()
        assert [i["content"] for i in stored.conversation(db, "resp_new")] == ["resp_old", "resp_new"]
        assert stored.purge_before(db, time.time() - 86400) == 1
        assert stored.owner_of(db, "resp_old") is None
        assert stored.item(db, "msg_resp_old") is None
        # The chain now starts at the response that is left.
        assert [i["content"] for i in stored.conversation(db, "resp_new")] == ["resp_new"]
    finally:
        db.close()
