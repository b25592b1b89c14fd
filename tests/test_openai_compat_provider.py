"""The openai provider, driven directly against the scripted fault upstream and a real locopilot."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest

from locopilot.engine.protocol import SamplingParams
from locopilot.errors import ContextLengthExceeded, InvalidRequest, LocopilotError, ModelNotFound, UpstreamError
from locopilot.providers.base import (
    Finish,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    Message,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    TopLogprob,
)
from locopilot.providers.openai_compat import EventParser, OpenAICompatProvider, _ChunkReader, generation_body
from tests.conftest import SMOL, Server
from tests.fakes.fault_upstream import FaultUpstream

KEY = "sk-test-secret-4f1c9a"
HELLO = [Message(role="user", content="Say hello.")]
WORDS = len(FaultUpstream.WORDS)


def said(count: int = WORDS) -> TextDelta:
    """The first ``count`` words as one delta: how many network reads they took is up to the kernel."""
    return TextDelta("".join(FaultUpstream.WORDS[:count]), count)


def merged(events: list[StreamEvent]) -> list[StreamEvent]:
    """``events`` with each run of text deltas joined into one."""
    joined: list[StreamEvent] = []
    for event in events:
        last = joined[-1] if joined else None
        if isinstance(event, TextDelta) and isinstance(last, TextDelta):
            joined[-1] = TextDelta(last.text + event.text, last.tokens + event.tokens)
        else:
            joined.append(event)
    return joined


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def upstream() -> Iterator[FaultUpstream]:
    fault = FaultUpstream().start()
    yield fault
    fault.stop()


@pytest.fixture
async def provider(upstream: FaultUpstream) -> AsyncIterator[OpenAICompatProvider]:
    opened = OpenAICompatProvider("fault", upstream.url)
    yield opened
    await opened.aclose()


def chat(**kwargs: object) -> GenerationRequest:
    return GenerationRequest(model="fault-small", messages=HELLO, **kwargs)


async def collect(provider: OpenAICompatProvider, request: GenerationRequest) -> list[StreamEvent]:
    return merged([event async for event in provider.stream(request)])


async def collect_until_error(
    provider: OpenAICompatProvider, request: GenerationRequest
) -> tuple[list[StreamEvent], LocopilotError]:
    """The events before the stream raised, and what it raised."""
    events: list[StreamEvent] = []
    try:
        async for event in provider.stream(request):
            events.append(event)
    except LocopilotError as exc:
        return merged(events), exc
    pytest.fail(f"the stream ended without an error after {events}")


# The normal answer and what is sent


@pytest.mark.anyio
async def test_chat_stream_is_text_then_one_finish_with_upstream_usage(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    events = await collect(provider, chat())
    assert events == [said(), Finish("stop", FaultUpstream.PROMPT_TOKENS, WORDS)]
    [sent] = upstream.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.body["messages"] == [{"role": "user", "content": "Say hello."}]
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert "authorization" not in sent.headers


@pytest.mark.anyio
async def test_chat_fields_are_mapped_and_unset_ones_omitted(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    sampling = SamplingParams(
        temperature=0.3, top_p=0.9, top_k=7, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.25, repeat_penalty=1.2
    )
    await collect(provider, chat(sampling=sampling))
    body = upstream.requests[0].body
    assert body["model"] == "fault-small"
    sent = {key: body[key] for key in sampling.__struct_fields__ if key in body}
    assert sent == {
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 7,
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repeat_penalty": 1.2,
    }
    for absent in ("max_tokens", "stop", "seed", "logit_bias", "echo", "response_format", "grammar", "prompt"):
        assert absent not in body


@pytest.mark.anyio
async def test_text_completion_fields_and_text(provider: OpenAICompatProvider, upstream: FaultUpstream) -> None:
    request = GenerationRequest(
        model="fault-small",
        prompt="Once upon",
        max_tokens=5,
        stop=["\n", "END"],
        echo=True,
        sampling=SamplingParams(seed=7, logit_bias={15: -100.0, 2: 3.5}),
    )
    events = await collect(provider, request)
    assert events == [said(), Finish("stop", FaultUpstream.PROMPT_TOKENS, WORDS)]
    [sent] = upstream.requests
    assert sent.path == "/v1/completions"
    assert "messages" not in sent.body
    assert {key: sent.body[key] for key in ("prompt", "max_tokens", "stop", "echo", "seed", "logit_bias")} == {
        "prompt": "Once upon",
        "max_tokens": 5,
        "stop": ["\n", "END"],
        "echo": True,
        "seed": 7,
        "logit_bias": {"15": -100.0, "2": 3.5},
    }
    assert sent.body["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ('{"type": "object"}', {"type": "json_object"}),
        (
            '{"type": "object", "properties": {"city": {"type": "string"}}}',
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "response",
                    "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            },
        ),
    ],
)
async def test_json_schema_becomes_response_format(
    provider: OpenAICompatProvider, upstream: FaultUpstream, schema: str, expected: dict[str, object]
) -> None:
    await collect(provider, chat(json_schema=schema))
    assert upstream.requests[0].body["response_format"] == expected


@pytest.mark.anyio
async def test_a_schema_that_is_not_json_is_refused_before_sending(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await collect(provider, chat(json_schema="{nope"))
    assert info.value.param == "response_format"
    assert upstream.requests == []


@pytest.mark.anyio
async def test_the_key_is_sent_as_bearer_and_never_shown(upstream: FaultUpstream) -> None:
    keyed = OpenAICompatProvider("cloud", upstream.url, api_key=KEY)
    try:
        await collect(keyed, chat())
        assert upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"
        upstream.mode = "status_401"
        _, refused = await collect_until_error(keyed, chat())
        upstream.mode = "refuse"
        _, unreachable = await collect_until_error(keyed, chat())
    finally:
        await keyed.aclose()
    shown = " ".join([repr(keyed), str(keyed), str(refused), repr(refused), str(unreachable), repr(unreachable)])
    assert "cloud" in shown
    assert KEY not in shown


@pytest.mark.anyio
async def test_an_empty_key_sends_no_authorization(upstream: FaultUpstream) -> None:
    unkeyed = OpenAICompatProvider("local", upstream.url, api_key="", locality="local")
    try:
        await collect(unkeyed, chat())
    finally:
        await unkeyed.aclose()
    assert "authorization" not in upstream.requests[0].headers
    assert unkeyed.locality == "local"


@pytest.mark.anyio
async def test_finish_counts_deltas_when_no_usage_arrives(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "no_usage"
    assert await collect(provider, chat()) == [said(), Finish("length", 0, WORDS)]


# Failures before the first event


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "status", "retryable", "retry_after"),
    [("status_500", 500, True, None), ("status_429", 429, True, 7), ("status_401", 401, False, None)],
)
async def test_http_errors_say_whether_failover_may_help(
    provider: OpenAICompatProvider, upstream: FaultUpstream, mode: str, status: int, retryable: bool, retry_after: int
) -> None:
    upstream.mode = mode
    events, raised = await collect_until_error(provider, chat())
    assert events == []
    assert type(raised) is UpstreamError
    assert (raised.retryable, raised.upstream_status, raised.retry_after) == (retryable, status, retry_after)


@pytest.mark.anyio
@pytest.mark.parametrize(("mode", "status"), [("status_401", 401), ("status_403", 403)])
async def test_auth_refusals_keep_the_upstream_body_byte_for_byte(
    provider: OpenAICompatProvider, upstream: FaultUpstream, mode: str, status: int
) -> None:
    upstream.mode = mode
    _, raised = await collect_until_error(provider, chat())
    assert isinstance(raised, UpstreamError)
    assert raised.retryable is False
    assert raised.upstream_status == status
    assert raised.upstream_body == FaultUpstream.PRO_REQUIRED_BODY
    assert "Pro plan required" in raised.message


@pytest.mark.anyio
async def test_a_refused_connection_is_retryable(provider: OpenAICompatProvider, upstream: FaultUpstream) -> None:
    upstream.mode = "refuse"
    events, raised = await collect_until_error(provider, chat())
    assert events == []
    assert isinstance(raised, UpstreamError)
    assert raised.retryable is True
    assert raised.upstream_status is None
    assert upstream.requests == []
    # The port opens again, so the same provider can recover.
    upstream.mode = "ok"
    assert (await collect(provider, chat()))[-1] == Finish("stop", FaultUpstream.PROMPT_TOKENS, WORDS)


@pytest.mark.anyio
async def test_an_upstream_that_hangs_times_out_as_retryable(upstream: FaultUpstream) -> None:
    upstream.mode = "hang"
    impatient = OpenAICompatProvider("slow", upstream.url, timeout=httpx.Timeout(10.0, read=0.3))
    try:
        events, raised = await collect_until_error(impatient, chat())
    finally:
        await impatient.aclose()
    assert events == []
    assert isinstance(raised, UpstreamError)
    assert raised.retryable is True
    assert "ReadTimeout" in raised.message
    assert len(upstream.requests) == 1  # it was sent, and never answered


@pytest.mark.anyio
async def test_a_missing_model_is_model_not_found(provider: OpenAICompatProvider) -> None:
    _, raised = await collect_until_error(
        provider, GenerationRequest(model=FaultUpstream.MISSING_MODEL, messages=HELLO)
    )
    assert type(raised) is ModelNotFound
    assert raised.message == f"The model `{FaultUpstream.MISSING_MODEL}` does not exist."


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["context_length", "error_field"])
async def test_an_oversized_prompt_is_context_length_exceeded(
    provider: OpenAICompatProvider, upstream: FaultUpstream, mode: str
) -> None:
    """As an HTTP 400 (OpenAI, vLLM), and as llama-server's ``error:`` SSE field."""
    upstream.mode = mode
    events, raised = await collect_until_error(provider, chat())
    assert events == []
    assert type(raised) is ContextLengthExceeded
    assert raised.param == "messages"


@pytest.mark.anyio
async def test_malformed_sse_before_any_text_is_retryable(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "malformed"
    events, raised = await collect_until_error(provider, chat())
    assert events == []
    assert type(raised) is UpstreamError
    assert raised.retryable is True


# Failures after the first event


@pytest.mark.anyio
async def test_malformed_sse_after_text_is_not_retryable(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "malformed_late"
    events, raised = await collect_until_error(provider, chat())
    assert events == [said(1)]
    assert type(raised) is UpstreamError
    assert raised.retryable is False


@pytest.mark.anyio
async def test_a_connection_that_dies_mid_stream_raises_after_its_text(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "die_after_3"
    events, raised = await collect_until_error(provider, chat())
    assert events == [said(3)]
    assert type(raised) is UpstreamError
    assert raised.retryable is False


@pytest.mark.anyio
async def test_a_connection_lost_after_the_finish_reason_only_loses_the_usage(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "die_after_finish"
    assert await collect(provider, chat()) == [said(), Finish("stop", 0, WORDS)]


@pytest.mark.anyio
async def test_a_stream_that_ends_unfinished_is_an_error(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "end_early"
    events, raised = await collect_until_error(provider, chat())
    assert events == [said(2)]
    assert type(raised) is UpstreamError
    assert "before it finished" in raised.message


@pytest.mark.anyio
async def test_an_error_event_mid_stream_raises_with_its_message(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "error_event"
    events, raised = await collect_until_error(provider, chat())
    assert events == [said(1)]
    assert type(raised) is UpstreamError
    assert raised.retryable is False
    assert "lost its GPU" in raised.message


class ClosedStreams(httpx.AsyncBaseTransport):
    """httpx's own transport, counting the response bodies that were closed (not merely dropped)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(retries=0)
        self.closed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=CountedClose(response.stream, self),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountedClose(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, transport: ClosedStreams) -> None:
        self.inner = inner
        self.transport = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.inner:
            yield part

    async def aclose(self) -> None:
        self.transport.closed += 1
        await self.inner.aclose()


@pytest.mark.anyio
async def test_closing_the_stream_early_hangs_up_on_the_upstream(upstream: FaultUpstream) -> None:
    upstream.mode = "stall_after_1"
    transport = ClosedStreams()
    watched = OpenAICompatProvider("fault", upstream.url, transport=transport)
    try:
        events = watched.stream(chat())
        assert await anext(events) == said(1)
        assert transport.closed == 0
        await events.aclose()
        assert transport.closed == 1
        assert await anyio.to_thread.run_sync(upstream.client_gone.wait, 30)
    finally:
        await watched.aclose()


# Models and embeddings


@pytest.mark.anyio
async def test_models_lists_the_upstream_ids(provider: OpenAICompatProvider, upstream: FaultUpstream) -> None:
    assert await provider.models() == list(FaultUpstream.MODELS)
    assert (upstream.requests[0].method, upstream.requests[0].path) == ("GET", "/v1/models")


@pytest.mark.anyio
async def test_models_from_a_failing_upstream_is_upstream_error(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "status_500"
    with pytest.raises(UpstreamError) as info:
        await provider.models()
    assert info.value.retryable is True
    assert info.value.upstream_status == 500


@pytest.mark.anyio
async def test_embed_returns_vectors_in_input_order(provider: OpenAICompatProvider, upstream: FaultUpstream) -> None:
    inputs = ["a", "bb bb", "ccc cc c"]
    result = await provider.embed("fault-small", inputs)
    # The fake lists them in reverse; each vector is [characters, index, 0.5].
    assert result.vectors == [[1.0, 0.0, 0.5], [5.0, 1.0, 0.5], [8.0, 2.0, 0.5]]
    assert result.prompt_tokens == 6
    assert upstream.requests[0].body == {"model": "fault-small", "input": inputs, "encoding_format": "float"}


@pytest.mark.anyio
async def test_embed_against_a_closed_port_is_retryable(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    upstream.mode = "refuse"
    with pytest.raises(UpstreamError) as info:
        await provider.embed("fault-small", ["x"])
    assert info.value.retryable is True


# A real upstream


@pytest.mark.anyio
async def test_a_real_locopilot_upstream_answers_through_the_provider(server: Server) -> None:
    real = OpenAICompatProvider("peer", server.url + "/v1", locality="local")
    question = [Message(role="user", content="Which city is the capital of France?")]
    request = GenerationRequest(
        model=SMOL, messages=question, max_tokens=24, sampling=SamplingParams(temperature=0.0, seed=1)
    )
    try:
        events = await collect(real, request)
    finally:
        await real.aclose()
    *deltas, finish = events
    assert all(isinstance(delta, TextDelta) for delta in deltas)
    assert "Paris" in "".join(delta.text for delta in deltas if isinstance(delta, TextDelta))
    assert isinstance(finish, Finish)
    assert finish.prompt_tokens > 0  # the usage chunk was asked for and read
    assert finish.completion_tokens > 0


def test_llama_cpp_extras_are_sent_only_when_set() -> None:
    # OpenAI's own API refuses fields it does not know, so defaults are not sent.
    _, plain, _ = generation_body(GenerationRequest(model="m", messages=[Message(role="user", content="x")]))
    assert not {"top_k", "min_p", "repeat_penalty"} & set(plain)
    tuned = GenerationRequest(model="m", prompt="x", sampling=SamplingParams(top_k=5, min_p=0.2))
    _, body, _ = generation_body(tuned)
    assert (body["top_k"], body["min_p"]) == (5, 0.2)
    assert "repeat_penalty" not in body


# Reading server-sent events from network reads


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_events_do_not_depend_on_where_the_network_splits_the_bytes(newline: bytes) -> None:
    lines = [b": comment", b'data: {"text": "caf\xc3\xa9 \xf0\x9f\x8e\x89"}', b"", b"data: one", b"data: two", b""]
    lines += [b'error: {"message": "bad"}', b"event: ignored", b"", b"event: progress", b"data: {}", b""]
    lines += [b"data: [DONE]", b"", b"data: cut off"]
    stream = newline.join(lines)
    expected = [
        ("data", '{"text": "café 🎉"}'),
        ("data", "one\ntwo"),
        ("error", '{"message": "bad"}'),
        ("progress", "{}"),  # a named event (locopilot's pull progress); the name lasts one event
        ("data", "[DONE]"),
    ]
    for split in range(len(stream) + 1):
        parser = EventParser()
        assert parser.feed(stream[:split]) + parser.feed(stream[split:]) == expected, split
    one_byte_at_a_time = EventParser()
    assert [event for i in range(len(stream)) for event in one_byte_at_a_time.feed(stream[i : i + 1])] == expected


# Tools, choices and logprobs


WEATHER_TOOL = FunctionTool(
    name="get_weather",
    description="The weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)


@pytest.mark.anyio
async def test_tool_calls_come_back_as_call_deltas(provider: OpenAICompatProvider, upstream: FaultUpstream) -> None:
    events = [
        event async for event in provider.stream(chat(tools=(WEATHER_TOOL,), tool_choice=ToolChoice(mode="required")))
    ]
    *calls, finish = events
    assert calls[0] == ToolCallDelta(call=0, id="call_fault0", name="get_weather", arguments="")
    assert all(isinstance(c, ToolCallDelta) and c.call == 0 and c.id is None and c.name is None for c in calls[1:])
    assert "".join(c.arguments for c in calls if isinstance(c, ToolCallDelta)) == '{"city": "Paris"}'
    assert finish == Finish("tool_calls", FaultUpstream.PROMPT_TOKENS, WORDS)
    body = upstream.requests[-1].body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    assert body["tool_choice"] == "required"
    assert "parallel_tool_calls" not in body  # true is OpenAI's default; some servers know no such field


@pytest.mark.anyio
async def test_choices_logprobs_and_suffix_pass_through(
    provider: OpenAICompatProvider, upstream: FaultUpstream
) -> None:
    request = GenerationRequest(model="fault-small", prompt="def f(", suffix="return x", n=2, logprobs=1)
    events = [event async for event in provider.stream(request)]
    body = upstream.requests[-1].body
    assert (body["n"], body["logprobs"], body["suffix"]) == (2, 1, "return x")
    for index in (0, 1):
        deltas = [e for e in events if isinstance(e, TextDelta) and e.index == index]
        assert "".join(d.text for d in deltas) == "".join(FaultUpstream.WORDS)
        logprobs = [lp for d in deltas for lp in d.logprobs]
        assert [lp.token for lp in logprobs] == list(FaultUpstream.WORDS)
        assert [lp.logprob for lp in logprobs] == [-0.5 * i for i in range(WORDS)]
        assert [top.token for lp in logprobs for top in lp.top] == ["x"] * WORDS
    assert events[-1] == Finish("stop", FaultUpstream.PROMPT_TOKENS, WORDS, reasons=("stop", "stop"))
    chat_events = [event async for event in provider.stream(chat(logprobs=2))]
    body = upstream.requests[-1].body
    assert (body["logprobs"], body["top_logprobs"]) == (True, 2)
    first = next(e for e in chat_events if isinstance(e, TextDelta))
    assert first.logprobs[0] == TokenLogprob(
        token="Hello", logprob=-0.0, bytes=list(b"Hello"), top=(TopLogprob(token="x", logprob=-1.0, bytes=[120]),)
    )


def test_call_pieces_without_an_index_are_numbered_by_their_ids() -> None:
    """Some servers leave ``index`` out of ``delta.tool_calls``: an id starts the next call."""
    reader = _ChunkReader("up", chat=True, param="messages")
    out: list[TextDelta | ToolCallDelta] = []
    for call in (
        {"id": "a", "function": {"name": "f", "arguments": "{"}},
        {"function": {"arguments": "}"}},
        {"id": "b", "function": {"name": "g", "arguments": "{}"}},
    ):
        reader.read("data", json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}), out)
    assert [(c.call, c.id) for c in out if isinstance(c, ToolCallDelta)] == [(0, "a"), (0, None), (1, "b")]


def test_messages_go_out_in_openai_form() -> None:
    messages = [
        Message(role="user", content="look", images=(ImagePart(url="data:image/png;base64,AA==", detail="low"),)),
        Message(role="assistant", tool_calls=(ToolCall(id="c1", name="f", arguments='{"a": 1}'),)),
        Message(role="tool", content="done", tool_call_id="c1"),
    ]
    _, body, _ = generation_body(
        GenerationRequest(model="m", messages=messages, tools=(WEATHER_TOOL,), parallel_tool_calls=False)
    )
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "content": "done", "tool_call_id": "c1"},
    ]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("auto", False)
    path, tokens, _ = generation_body(GenerationRequest(model="m", prompt_tokens=[5, 6]))
    assert (path, tokens["prompt"]) == ("/completions", [5, 6])
