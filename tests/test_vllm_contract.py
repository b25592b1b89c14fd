"""What locopilot relies on from vLLM's OpenAI-compatible server, and that it holds through locopilot.

Run against :class:`tests.fakes.vllm.VLLMStandIn` in both of vLLM's error styles (current releases
nest the error; releases before 0.10 sent a flat ``"object": "error"`` body). Point
``TEST_VLLM_URL`` at a real ``vllm serve`` (its ``…/v1``; ``TEST_VLLM_MODEL``
names the model, else the first it lists) to run the same tests against it too; the ``real``
cases are skipped otherwise. Against a real vLLM the auto tool-choice case needs
``--enable-auto-tool-choice --tool-call-parser hermes`` and a model that calls tools.

Each case is checked twice: on the wire, straight to the upstream (the contract), and through a
locopilot server that has it as an upstream, with the official ``openai`` client (what users get).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server
from tests.fakes.vllm import FAIL, VLLMStandIn

VLLM_URL = "TEST_VLLM_URL"
VLLM_MODEL = "TEST_VLLM_MODEL"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@dataclass(frozen=True)
class Target:
    name: str  # the upstream's provider name in the front
    url: str  # its /v1
    model: str
    real: bool = False
    error_style: str = "nested"


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, Target]]:
    nested = VLLMStandIn("qwen-new", error_style="nested").start()
    flat = VLLMStandIn("qwen-old", error_style="flat").start()
    found = {
        "nested": Target("vllm", nested.url, nested.model),
        "flat": Target("vllm_old", flat.url, flat.model, error_style="flat"),
    }
    if url := os.environ.get(VLLM_URL):
        url = url.rstrip("/")
        model = os.environ.get(VLLM_MODEL) or httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
        found["real"] = Target("vllm_real", url, model, real=True)
    yield found
    nested.stop()
    flat.stop()


@pytest.fixture(params=["nested", "flat", "real"])
def target(request: pytest.FixtureRequest, targets: dict[str, Target]) -> Target:
    if request.param not in targets:
        pytest.skip(f"set {VLLM_URL} to a real vLLM server's /v1 to run this against it")
    return targets[request.param]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, targets: dict[str, Target]) -> Iterator[Server]:
    upstreams = [{"name": t.name, "url": t.url, "locality": "local", "priority": 5} for t in targets.values()]
    env = {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams), "LOCOPILOT_MAX_MESSAGE_BYTES": str(1 << 24)}
    running = Server(tmp_path_factory.mktemp("vllm-front"), {}, env).start(path="/health")
    yield running
    running.stop()


def client_of(front: Server) -> openai.OpenAI:
    return front.client()


def max_model_len(target: Target) -> int:
    card = next(m for m in httpx.get(f"{target.url}/models", timeout=30).json()["data"] if m["id"] == target.model)
    length: int = card["max_model_len"]
    return length


def too_long(target: Target) -> list[dict[str, str]]:
    return [{"role": "user", "content": "hello " * (max_model_len(target) + 16)}]


def sse(target: Target, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    """The upstream's streamed answer to ``body``: the response and each ``data:`` field."""
    with httpx.stream("POST", f"{target.url}/chat/completions", json=body, timeout=120) as response:
        lines = [line for line in response.iter_lines()]
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert all(not line or line.startswith("data: ") for line in lines), lines  # nothing but data events
    return response, events


# -- the contract, on the wire ---------------------------------------------------------------


def test_models_name_max_model_len(target: Target) -> None:
    listed = httpx.get(f"{target.url}/models", timeout=30).json()
    assert listed["object"] == "list"
    card = next(m for m in listed["data"] if m["id"] == target.model)
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert isinstance(card["max_model_len"], int) and card["max_model_len"] > 0


def test_stream_ends_with_a_usage_chunk_when_asked(target: Target) -> None:
    body = {"model": target.model, "messages": QUESTION, "max_tokens": 16, "stream": True}
    response, events = sse(target, body | {"stream_options": {"include_usage": True}})
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == target.model for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 16
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c.get("usage") is None for c in chunks[:-1])  # no usage before the last chunk
    # Without include_usage there is none at all.
    _, plain = sse(target, body)
    assert all(json.loads(e).get("usage") is None for e in plain[:-1])


def test_named_tool_choice_streams_name_once_then_arguments(target: Target) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": target.model, "messages": [{"role": "user", "content": "Weather in Paris?"}], "stream": True}
    _, events = sse(target, body | {"tools": TOOLS, "tool_choice": choice, "max_tokens": 64})
    deltas = [
        call for e in events[:-1] for c in json.loads(e)["choices"] for call in (c["delta"].get("tool_calls") or [])
    ]
    assert deltas[0]["id"] and deltas[0]["type"] == "function" and deltas[0]["function"]["name"] == "get_weather"
    assert all(d["index"] == 0 and "name" not in d.get("function", {}) for d in deltas[1:])
    arguments = "".join(d["function"].get("arguments") or "" for d in deltas)
    assert isinstance(json.loads(arguments), dict)


def test_auto_tool_choice_streams_a_call(target: Target) -> None:
    if target.real and not os.environ.get("LOCOPILOT_TEST_VLLM_AUTO_TOOLS"):
        pytest.skip("set LOCOPILOT_TEST_VLLM_AUTO_TOOLS=1 when the vLLM server runs with --enable-auto-tool-choice")
    body = {"model": target.model, "messages": [{"role": "user", "content": "Weather in Paris?"}], "stream": True}
    _, events = sse(target, body | {"tools": TOOLS, "tool_choice": "auto"})
    chunks = [json.loads(e) for e in events[:-1]]
    first = next(
        c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")
    )
    assert first["id"].startswith("chatcmpl-tool-") and first["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def error_of(target: Target, body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's error fields, from either era's body."""
    if target.error_style == "flat":
        assert body["object"] == "error"
        return body
    return body["error"]  # type: ignore[no-any-return]


def test_a_prompt_over_max_model_len_is_a_400(target: Target) -> None:
    answer = httpx.post(
        f"{target.url}/chat/completions", json={"model": target.model, "messages": too_long(target)}, timeout=120
    )
    assert answer.status_code == 400
    error = error_of(target, answer.json())
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert f"maximum context length is {max_model_len(target)} tokens" in error["message"]


def test_max_tokens_over_what_is_left_is_a_400(target: Target) -> None:
    body = {"model": target.model, "messages": QUESTION, "max_tokens": max_model_len(target)}
    answer = httpx.post(f"{target.url}/chat/completions", json=body, timeout=120)
    assert answer.status_code == 400
    assert "maximum context length" in error_of(target, answer.json())["message"]


def test_an_unknown_model_is_a_404(target: Target) -> None:
    answer = httpx.post(f"{target.url}/chat/completions", json={"model": "no-such-model", "messages": QUESTION})
    assert answer.status_code == 404
    assert error_of(target, answer.json())["type"] == "NotFoundError"


# -- through locopilot, with the openai client -----------------------------------------------


def test_streamed_usage_reaches_the_client(front: Server, target: Target) -> None:
    direct = httpx.post(
        f"{target.url}/chat/completions",
        json={"model": target.model, "messages": QUESTION, "max_tokens": 16, "temperature": 0},
        timeout=120,
    ).json()
    stream = client_of(front).chat.completions.create(
        model=target.model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert text == direct["choices"][0]["message"]["content"]


def test_a_tool_call_reaches_the_client_whole(front: Server, target: Target) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    with client_of(front).chat.completions.stream(
        model=target.model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=64,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"  # once: not repeated per delta
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def ask(front: Server, target: Target, messages: list[dict[str, str]], stream: bool) -> str:
    """The reply's text; a streamed one read to its end."""
    client = client_of(front)
    if not stream:
        answer = client.chat.completions.create(model=target.model, messages=messages)  # type: ignore[arg-type]
        return answer.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=target.model, messages=messages, stream=True)  # type: ignore[arg-type]
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_context_too_long_is_the_clients_400(front: Server, target: Target, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(front, target, too_long(target), stream)
    error: Any = refused.value.body
    assert refused.value.status_code == 400
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length" in error["message"]


def test_a_mid_stream_failure_is_not_a_clean_end(front: Server, target: Target) -> None:
    if target.real:
        pytest.skip("a real vLLM cannot be made to fail mid-stream on demand")
    stream = client_of(front).chat.completions.create(
        model=target.model, messages=[{"role": "user", "content": FAIL}], stream=True
    )
    received: list[str] = []

    def read_all() -> None:
        for chunk in stream:
            received.extend(c.delta.content or "" for c in chunk.choices)

    with pytest.raises(openai.APIError) as failed:
        read_all()
    assert "".join(received) == "The capital"  # what came before the failure still arrived
    assert "Engine loop has died" in str(failed.value)
