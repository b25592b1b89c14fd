"""OllamaProvider against the Ollama stand-in on a real loopback socket."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from locopilot.engine.protocol import SamplingParams
from locopilot.errors import InvalidRequest, ModelNotFound, UpstreamError
from locopilot.providers.base import (
    Finish,
    FunctionTool,
    GenerationRequest,
    Message,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
)
from locopilot.providers.ollama import OllamaProvider
from tests.conftest import free_port
from tests.fakes.ollama import SENTENCE, OllamaStandIn

MODEL = "llama3.2:1b"
NUM_CTX = 8192
SAMPLING = SamplingParams(
    temperature=0.3,
    top_p=0.9,
    top_k=20,
    min_p=0.1,
    presence_penalty=0.5,
    frequency_penalty=0.25,
    repeat_penalty=1.2,
    seed=42,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ollama() -> Iterator[OllamaStandIn]:
    with OllamaStandIn(models=[MODEL, "qwen2.5:0.5b"]) as stand_in:
        yield stand_in


@pytest.fixture
async def provider(ollama: OllamaStandIn) -> AsyncIterator[OllamaProvider]:
    provider = OllamaProvider("ollama", ollama.url, num_ctx=NUM_CTX)
    yield provider
    await provider.aclose()


def chat(**fields: Any) -> GenerationRequest:
    return GenerationRequest(model=MODEL, messages=[Message(role="user", content="Say hello to me")], **fields)


async def collect(provider: OllamaProvider, request: GenerationRequest) -> tuple[str, list[StreamEvent]]:
    events = [event async for event in provider.stream(request)]
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    return text, events


@pytest.mark.anyio
async def test_chat_stream_yields_the_reply_and_counts(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    text, events = await collect(provider, chat())
    assert text == SENTENCE
    deltas = events[:-1]
    assert all(isinstance(event, TextDelta) and event.tokens == 1 for event in deltas)
    assert len(deltas) == len(SENTENCE.split())
    assert events[-1] == Finish("stop", 4, len(SENTENCE.split()))
    (body,) = ollama.bodies("/api/chat")
    assert body["messages"] == [{"role": "user", "content": "Say hello to me"}]
    assert body["model"] == MODEL
    assert body["stream"] is True


@pytest.mark.anyio
async def test_sampling_goes_under_options_with_num_ctx(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    await collect(provider, chat(sampling=SAMPLING, max_tokens=100, stop=["END"]))
    (body,) = ollama.bodies("/api/chat")
    assert set(body) == {"model", "messages", "stream", "options"}
    assert body["options"] == {
        "num_ctx": NUM_CTX,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repeat_penalty": 1.2,
        "seed": 42,
        "num_predict": 100,
        "stop": ["END"],
    }


@pytest.mark.anyio
async def test_unset_limits_are_left_to_ollama(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    await collect(provider, chat())
    (body,) = ollama.bodies("/api/chat")
    assert body["options"]["num_ctx"] == NUM_CTX
    assert not {"seed", "num_predict", "stop"} & set(body["options"])


@pytest.mark.anyio
async def test_text_completion_uses_generate_raw(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    text, events = await collect(provider, GenerationRequest(model=MODEL, prompt="Once upon a time", sampling=SAMPLING))
    assert text == SENTENCE
    assert events[-1] == Finish("stop", 4, len(SENTENCE.split()))
    (body,) = ollama.bodies("/api/generate")
    assert set(body) == {"model", "prompt", "raw", "stream", "options"}
    assert body["raw"] is True
    assert body["prompt"] == "Once upon a time"
    assert body["options"]["temperature"] == 0.3
    assert list(ollama.bodies("/api/chat")) == []


@pytest.mark.anyio
async def test_echo_prepends_the_prompt(provider: OllamaProvider) -> None:
    text, events = await collect(provider, GenerationRequest(model=MODEL, prompt="Once upon a time", echo=True))
    assert text == "Once upon a time" + SENTENCE
    assert events[0] == TextDelta("Once upon a time", 0)


@pytest.mark.anyio
async def test_json_schema_becomes_format(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    schema = {"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"]}
    text, _ = await collect(provider, chat(json_schema=json.dumps(schema)))
    assert json.loads(text) == {"reply": SENTENCE}
    (body,) = ollama.bodies("/api/chat")
    assert body["format"] == schema
    assert "format" not in body["options"]


@pytest.mark.anyio
async def test_max_tokens_truncates_with_reason_length(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    text, events = await collect(provider, chat(max_tokens=2))
    assert text == "Hello from"
    assert events[-1] == Finish("length", 4, 2)
    (body,) = ollama.bodies("/api/chat")
    assert body["options"]["num_predict"] == 2


@pytest.mark.anyio
async def test_logit_bias_is_refused_before_any_request(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await collect(provider, chat(sampling=SamplingParams(logit_bias={1: 5.0})))
    assert caught.value.param == "logit_bias"
    assert ollama.requests == []


@pytest.mark.anyio
async def test_token_prompts_are_refused_before_any_request(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await collect(provider, GenerationRequest(model=MODEL, prompt_tokens=[1, 2, 3]))
    assert caught.value.param == "prompt"
    assert ollama.requests == []


@pytest.mark.anyio
async def test_streamed_tool_calls_become_call_deltas(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    """Each call comes whole in one line; an older Ollama's calls without ids get OpenAI-style ones."""
    ollama.call_ids = False
    ollama.call_tools = ["f", "f"]
    tool = FunctionTool(name="f", parameters={"type": "object", "properties": {"n": {"type": "integer"}}})
    text, events = await collect(provider, chat(tools=(tool,)))
    assert text == ""
    first, second, finish = events
    assert isinstance(first, ToolCallDelta) and isinstance(second, ToolCallDelta)
    assert [(e.call, e.name, e.arguments) for e in (first, second)] == [(0, "f", '{"n":3}'), (1, "f", '{"n":3}')]
    assert first.id and second.id and first.id != second.id and first.id.startswith("call_")
    assert finish == Finish("tool_calls", 4, 15)


@pytest.mark.anyio
async def test_unknown_model_is_model_not_found(provider: OllamaProvider) -> None:
    with pytest.raises(ModelNotFound):
        await collect(provider, GenerationRequest(model="nope:7b", messages=[Message(role="user", content="hi")]))
    with pytest.raises(ModelNotFound):
        await provider.embed("nope:7b", ["hi"])


@pytest.mark.anyio
async def test_wrong_base_url_is_not_model_not_found(ollama: OllamaStandIn) -> None:
    provider = OllamaProvider("ollama", ollama.url + "/v1", num_ctx=NUM_CTX)
    try:
        with pytest.raises(UpstreamError) as caught:
            await collect(provider, chat())
    finally:
        await provider.aclose()
    assert caught.value.upstream_status == 404
    assert caught.value.upstream_body == b"404 page not found"
    assert not caught.value.retryable


@pytest.mark.anyio
async def test_connection_refused_is_retryable() -> None:
    provider = OllamaProvider("ollama", f"http://127.0.0.1:{free_port()}", num_ctx=NUM_CTX)
    try:
        with pytest.raises(UpstreamError) as stream_error:
            await collect(provider, chat())
        with pytest.raises(UpstreamError) as models_error:
            await provider.models()
    finally:
        await provider.aclose()
    assert stream_error.value.retryable
    assert models_error.value.retryable
    assert stream_error.value.upstream_status is None


@pytest.mark.anyio
async def test_server_error_is_retryable(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    ollama.fail_next(500, b'{"error":"llama runner process has terminated"}')
    with pytest.raises(UpstreamError) as caught:
        await collect(provider, chat())
    assert caught.value.retryable
    assert caught.value.upstream_status == 500
    assert caught.value.upstream_body == b'{"error":"llama runner process has terminated"}'
    text, _ = await collect(provider, chat())
    assert text == SENTENCE


@pytest.mark.anyio
async def test_too_many_requests_is_retryable_with_retry_after(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    ollama.fail_next(429, b'{"error":"server busy, please try again"}', {"Retry-After": "7"})
    with pytest.raises(UpstreamError) as caught:
        await collect(provider, chat())
    assert caught.value.retryable
    assert caught.value.retry_after == 7


@pytest.mark.anyio
async def test_bad_request_is_the_clients_with_ollamas_words(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    """Ollama's 400 is about the request: a 400 for the client, in Ollama's words, no failover."""
    ollama.fail_next(400, b'{"error":"invalid format"}')
    with pytest.raises(InvalidRequest) as caught:
        await collect(provider, chat())
    assert caught.value.status_code == 400
    assert caught.value.message == "invalid format"
    assert caught.value.quotes_input


@pytest.mark.anyio
async def test_error_line_mid_stream_raises_after_the_first_events(
    provider: OllamaProvider, ollama: OllamaStandIn
) -> None:
    ollama.error_after = (2, "an error was encountered while running the model")
    received: list[StreamEvent] = []

    async def consume() -> None:
        async for event in provider.stream(chat()):
            received.append(event)

    with pytest.raises(UpstreamError) as caught:
        await consume()
    assert received == [TextDelta("Hello", 1), TextDelta(" from", 1)]
    assert not caught.value.retryable
    assert "an error was encountered" in caught.value.message


@pytest.mark.anyio
async def test_embed(provider: OllamaProvider, ollama: OllamaStandIn) -> None:
    result = await provider.embed(MODEL, ["one two", "three"])
    assert len(result.vectors) == 2
    assert result.vectors[0] != result.vectors[1]
    assert all(abs(sum(value * value for value in vector) - 1.0) < 1e-9 for vector in result.vectors)
    assert result.prompt_tokens == 3
    assert list(ollama.bodies("/api/embed")) == [{"model": MODEL, "input": ["one two", "three"]}]


@pytest.mark.anyio
async def test_models_lists_tags(provider: OllamaProvider) -> None:
    assert await provider.models() == [MODEL, "qwen2.5:0.5b"]


@pytest.mark.anyio
async def test_closing_the_stream_early_closes_the_upstream_response(
    provider: OllamaProvider, ollama: OllamaStandIn
) -> None:
    ollama.endless = True
    # The bound turns a hang (a close that drains an endless response) into a failure.
    with anyio.fail_after(30):
        stream = provider.stream(chat())
        first = await anext(stream)
        await stream.aclose()
        assert first == TextDelta("Hello", 1)
    assert await anyio.to_thread.run_sync(ollama.disconnected.wait, 30)
    ollama.endless = False
    text, _ = await collect(provider, chat())
    assert text == SENTENCE
