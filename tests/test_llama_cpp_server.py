"""Routing through a front locopilot to llama-cpp-python's own server, a locopilot-free upstream.

``python -m llama_cpp.server`` (the ``[server]`` extra) serves SmolLM2 on
loopback. The front has no models of its own and reaches that one server as two
providers: ``llamacpp`` from ``LOCOPILOT_LLAMACPP_URL`` and ``pyllama`` from
``LOCOPILOT_UPSTREAMS``. The official openai client drives both the front and,
for comparison, the upstream directly; decoding is greedy, so both must agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Server, free_port, start_server
from tests.test_api import wait_for_log_row

MODEL = "smollm2-135m-pyserver"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Which city is the capital of France?"}]
STORY: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
PROMPT = "The capital of France is"

LAUNCHER = Path(__file__).resolve().parents[1] / "bench" / "llama_cpp_server.py"
"""llama_cpp.server with ggml's backends loaded first (this build uses GGML_BACKEND_DL)."""


class LlamaCppServer:
    """``python -m llama_cpp.server`` on a free loopback port, in its own process group."""

    def __init__(self, model: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = [
            "--model", str(model),
            "--model_alias", MODEL,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", "2048",
            "--n_threads", "2",
            "--n_threads_batch", "2",
            "--embedding", "True",
            # SmolLM2's GGUF names no pooling, so llama.cpp would answer one vector per token
            # (a list of lists, not OpenAI's shape); the server has no flag for it, the GGUF key does.
            "--kv_overrides", "llama.pooling_type=int:1",
            # By default any request that arrives during a stream, even GET /v1/models (the front's
            # health probe), ends that stream and drops the connection mid-body; queue them instead.
            "--interrupt_requests", "False",
            "--verbose", "False",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> LlamaCppServer:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(LAUNCHER), *self.args],
                env={k: v for k, v in os.environ.items() if not k.startswith("LOCOPILOT_")},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[LlamaCppServer]:
    server = LlamaCppServer(smollm2_path, tmp_path_factory.mktemp("llama_cpp_server") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(upstream: LlamaCppServer) -> Iterator[openai.OpenAI]:
    """An openai client that talks to llama_cpp.server itself."""
    client = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, upstream: LlamaCppServer) -> Iterator[Server]:
    pyllama = {"name": "pyllama", "kind": "openai", "url": f"{upstream.url}/v1", "locality": "local", "priority": 30}
    running = start_server(
        tmp_path_factory,
        {},
        {"LOCOPILOT_LLAMACPP_URL": upstream.url, "LOCOPILOT_UPSTREAMS": json.dumps([pyllama])},
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(front: Server) -> openai.OpenAI:
    return front.client()


def test_the_upstream_is_llama_cpp_server_itself(upstream: LlamaCppServer, direct: openai.OpenAI) -> None:
    assert [model.id for model in direct.models.list()] == [MODEL]
    response = httpx.get(f"{upstream.url}/v1/models", timeout=10)
    assert response.headers["server"] == "uvicorn"
    assert "x-locopilot-provider" not in response.headers


def test_chat_matches_the_upstream_and_says_where_it_was_served(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    expected = direct.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    # LOCOPILOT_LLAMACPP_URL (priority 20) comes before the listed upstream (priority 30).
    assert raw.headers["x-locopilot-provider"] == "llamacpp"
    assert raw.headers["x-locopilot-model"] == MODEL
    reply = raw.parse()
    assert reply.model == MODEL
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == expected.choices[0].finish_reason == "stop"
    assert reply.usage is not None and expected.usage is not None
    assert reply.usage.completion_tokens == expected.usage.completion_tokens


def test_usage_without_stream_usage_counts_completion_tokens_only(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    # llama_cpp.server 0.3.36 ignores stream_options: its streams carry no usage at all,
    # and locopilot always streams upstream (so the upstream timeout bounds each chunk, not
    # the whole answer). The completion is counted by its events; the prompt stays unknown, 0.
    expected = direct.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert reply.usage is not None and expected.usage is not None
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert reply.usage.prompt_tokens == 0
    assert reply.usage.total_tokens == reply.usage.completion_tokens


def test_streamed_chat_arrives_in_pieces_with_finish_reason_and_usage(
    client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    # Long enough that the front, which forwards what each network read brings, cannot get it all in one read.
    sampling: dict[str, Any] = {"model": MODEL, "messages": STORY, "max_tokens": 48, "temperature": 0}
    expected = direct.chat.completions.create(**sampling)
    chunks = list(client.chat.completions.create(**sampling, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == expected.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [expected.choices[0].finish_reason] == ["length"]
    # With include_usage, only the last chunk carries usage, and it has no choices.
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage is not None and expected.usage is not None
    assert chunks[-1].choices == []
    assert usage.completion_tokens == expected.usage.completion_tokens == 48
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_text_completion_matches_the_upstream(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    expected = direct.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert raw.headers["x-locopilot-provider"] == "llamacpp"
    reply = raw.parse()
    assert reply.choices[0].text == expected.choices[0].text
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason == "length"
    longer = direct.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in streamed if c.choices and c.choices[0].text]
    assert len(pieces) > 1
    assert "".join(pieces) == longer.choices[0].text


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        (f"pyllama:{MODEL}", "pyllama"),
        (f"pyllama/{MODEL}", "pyllama"),
        (f"llamacpp:{MODEL}", "llamacpp"),
        (f"llamacpp/{MODEL}", "llamacpp"),
    ],
)
def test_explicit_prefix_picks_the_provider(front: Server, client: openai.OpenAI, model: str, provider: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    assert raw.headers["x-locopilot-provider"] == provider
    assert raw.headers["x-locopilot-model"] == MODEL
    assert "Paris" in (raw.parse().choices[0].message.content or "")
    row = wait_for_log_row(front, raw.headers["x-request-id"])
    assert row["provider"] == provider


def test_models_list_names_provider_and_locality(front: Server, client: openai.OpenAI) -> None:
    body = httpx.get(f"{front.url}/v1/models", timeout=30).json()
    # One entry per name: the first provider in priority order that lists it.
    (card,) = [card for card in body["data"] if card["id"] == MODEL]
    assert card["provider"] == "llamacpp"
    assert card["locality"] == "local"
    assert MODEL in [model.id for model in client.models.list()]
    for model_id in (MODEL, f"llamacpp:{MODEL}", f"llamacpp/{MODEL}"):
        assert client.models.retrieve(model_id).id == MODEL


def test_embeddings_match_the_upstream(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    inputs = ["The capital of France is Paris.", "hello"]
    expected = direct.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
    assert [len(item.embedding) for item in expected.data] == [576, 576]
    for model in (MODEL, f"pyllama:{MODEL}"):
        # The client asks for base64 by default: locopilot packs the upstream's floats as float32.
        reply = client.embeddings.create(model=model, input=inputs)
        assert [item.index for item in reply.data] == [0, 1]
        for got, want in zip(reply.data, expected.data, strict=True):
            assert got.embedding == pytest.approx(want.embedding, rel=1e-5, abs=1e-6)
        assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
