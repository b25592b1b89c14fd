"""Ollama's API (/api/*) through the real server, driven by the official ``ollama`` client.

Behind one locopilot (the front): SmolLM2 embedded, the Ollama stand-in (``llama3.2:latest``,
``qwen2.5:0.5b``, and ``qwen3:0.6b`` which thinks) and a second locopilot serving SmolLM2 as
``peer-smol`` over the OpenAI API.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from locopilot.api.ollama_requests import keep_alive_seconds
from locopilot.errors import InvalidRequest
from locopilot.gateway.router import served_name
from locopilot.providers.base import ModelDescription
from locopilot.providers.openai_compat import described
from tests.conftest import SMOL, Server, start_server
from tests.fakes.ollama import CONTEXT_LENGTH, LICENSE, SENTENCE, TEMPLATE, THOUGHT, OllamaStandIn

CAPITAL = [{"role": "user", "content": "Which city is the capital of France?"}]
PEER = "peer-smol"
# Greedy, and short: a reply that does not stop runs to the end of the context (minutes on two cores).
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def stand_in() -> Iterator[OllamaStandIn]:
    with OllamaStandIn(models=["llama3.2:latest", "qwen2.5:0.5b", "qwen3:0.6b"], thinkers=["qwen3:0.6b"]) as running:
        yield running


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path_factory, {PEER: smollm2_path})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def front(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, stand_in: OllamaStandIn, peer: Server
) -> Iterator[Server]:
    upstreams = [
        {"name": "ollama", "kind": "ollama", "url": stand_in.url, "locality": "local", "priority": 10},
        {"name": "peer", "url": f"{peer.url}/v1", "locality": "local", "priority": 20},
    ]
    running = start_server(tmp_path_factory, {SMOL: smollm2_path}, {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams)})
    yield running
    running.stop()


@pytest.fixture
def client(front: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=front.url, timeout=600) as running:
        yield running


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def assert_statistics(final: Any, *, loaded: bool = False) -> None:
    """The last object's statistics: counted, and durations measured (nanoseconds, adding up)."""
    assert final.done is True
    assert final.prompt_eval_count > 0
    assert final.eval_count > 0
    assert final.eval_duration > 0
    assert final.prompt_eval_duration > 0
    assert final.load_duration >= 0 if loaded else final.load_duration == 0
    parts = final.load_duration + final.prompt_eval_duration + final.eval_duration
    assert parts <= final.total_duration < parts + 5_000_000_000
    # The whole reply took less than the ten minutes the client waits: these are nanoseconds.
    assert final.total_duration < 600 * 10**9


# The root, the version, the model list


def test_root_answers_like_ollama(front: Server) -> None:
    for method in ("GET", "HEAD"):
        response = httpx.request(method, f"{front.url}/", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
    assert httpx.get(f"{front.url}/", timeout=10).text == "Ollama is running"


def test_version(front: Server) -> None:
    response = httpx.get(f"{front.url}/api/version", timeout=10)
    assert response.status_code == 200
    major, minor, _ = response.json()["version"].split(".")
    assert (int(major), int(minor)) >= (0, 5)


def test_list_names_every_model_with_a_tag(client: ollama.Client) -> None:
    models = {model.model: model for model in client.list().models}
    assert {f"{SMOL}:latest", "llama3.2:latest", "qwen2.5:0.5b", f"{PEER}:latest"} <= set(models)
    smol = models[f"{SMOL}:latest"]
    assert smol.details is not None
    assert (smol.details.family, smol.details.format) == ("llama", "gguf")
    assert smol.details.quantization_level == "Q4_1"
    assert smol.details.parameter_size == "134.52M"
    assert smol.size is not None and smol.size > 50_000_000
    assert smol.digest is not None and len(smol.digest) == 64


def test_show_reads_the_gguf_header(client: ollama.Client) -> None:
    for name in (SMOL, f"{SMOL}:latest"):
        shown = client.show(name)
        assert shown.details is not None
        assert (shown.details.family, shown.details.quantization_level) == ("llama", "Q4_1")
        assert shown.modelinfo is not None
        assert shown.modelinfo["general.architecture"] == "llama"
        assert shown.modelinfo["llama.context_length"] == 8192
        assert shown.modelinfo["general.parameter_count"] > 100_000_000
        # SmolLM2's template knows no tools; the engine's generic tool calling serves it.
        assert shown.capabilities == ["completion", "tools"]
        assert shown.template is not None and "im_start" in shown.template


def test_show_of_an_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404


# Chat and generate on the embedded engine


def test_chat_whole(client: ollama.Client) -> None:
    reply = client.chat(model=SMOL, messages=CAPITAL, options=GREEDY)
    assert "Paris" in (reply.message.content or "")
    assert reply.message.role == "assistant"
    assert reply.done_reason == "stop"
    assert reply.model == SMOL
    assert_statistics(reply, loaded=True)


def test_chat_streamed_as_ndjson(client: ollama.Client, front: Server) -> None:
    parts = list(client.chat(model=f"{SMOL}:latest", messages=CAPITAL, options=GREEDY, stream=True))
    *chunks, final = parts
    assert chunks and all(not part.done for part in chunks)
    assert "Paris" in "".join(part.message.content or "" for part in chunks)
    assert final.done_reason == "stop"
    assert final.eval_count >= len(chunks)
    assert_statistics(final, loaded=True)
    response = httpx.post(
        f"{front.url}/api/chat", json={"model": SMOL, "messages": CAPITAL, "options": {"num_predict": 3}}, timeout=600
    )
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(response)
    assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
    assert "total_duration" not in lines[0] and "eval_count" in lines[-1]


def test_generate_whole_and_streamed_stop_at_num_predict(client: ollama.Client) -> None:
    whole = client.generate(model=SMOL, prompt="Tell me a story.", options={"num_predict": 5})
    assert whole.done_reason == "length"
    assert whole.eval_count == 5
    assert whole.response
    assert_statistics(whole, loaded=True)
    streamed = list(client.generate(model=SMOL, prompt="Tell me a story.", options={"num_predict": 4}, stream=True))
    assert streamed[-1].done_reason == "length"
    assert streamed[-1].eval_count == 4
    assert streamed[-1].response == ""
    assert "".join(part.response or "" for part in streamed[:-1])


def test_generate_applies_the_template_unless_raw(client: ollama.Client) -> None:
    templated = client.generate(model=SMOL, prompt="Which city is the capital of France?", options=GREEDY)
    assert "Paris" in (templated.response or "")
    raw_prompt = "<|im_start|>user\nWhich city is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    raw = client.generate(model=SMOL, prompt=raw_prompt, raw=True, options=GREEDY)
    assert raw.response == templated.response
    # The system prompt reaches the template: a different reply than without it.
    told = client.generate(
        model=SMOL, prompt="What is your name?", system="Your name is Zorblax. Always say it.", options=GREEDY
    )
    plain = client.generate(model=SMOL, prompt="What is your name?", options=GREEDY)
    assert told.response != plain.response


def test_options_reach_the_sampler(client: ollama.Client) -> None:
    seeded = {"temperature": 1.5, "seed": 7, "num_predict": 6, "top_k": 100, "top_p": 1.0, "min_p": 0.0}
    first = client.generate(model=SMOL, prompt="Write a word.", options=seeded)
    again = client.generate(model=SMOL, prompt="Write a word.", options=seeded)
    assert first.response == again.response
    others = {
        client.generate(model=SMOL, prompt="Write a word.", options={**seeded, "seed": s}).response
        for s in range(8, 10)
    }
    assert len(others | {first.response}) > 1
    # A stop string cuts the reply before it; unknown options are ignored, as Ollama ignores them.
    stopped = client.chat(
        model=SMOL, messages=CAPITAL, options={**GREEDY, "stop": ["Paris"], "mirostat": 2, "num_thread": 3}
    )
    assert "Paris" not in (stopped.message.content or "")
    assert stopped.done_reason == "stop"
    penalised = client.chat(
        model=SMOL,
        messages=CAPITAL,
        options={"num_predict": 3, "repeat_penalty": 1.3, "presence_penalty": 1.5, "frequency_penalty": 1.0},
    )
    assert penalised.eval_count == 3


def test_format_json_and_schema(client: ollama.Client, stand_in: OllamaStandIn) -> None:
    # "json": the grammar allows an object only, from the first token on.
    started = client.generate(model=SMOL, prompt="Tell me about Paris.", format="json", options={"num_predict": 3})
    assert (started.response or "").lstrip().startswith("{")
    schema = {
        "type": "object",
        # A bound on the string keeps this 135M model from writing an essay inside it.
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    reply = client.chat(model=SMOL, messages=CAPITAL, format=schema, options={"temperature": 0, "num_predict": 40})
    assert set(json.loads(reply.message.content or "")) == {"city"}
    # To an Ollama upstream the schema goes as Ollama's format.
    stand_in.requests.clear()
    client.chat(model="llama3.2", messages=CAPITAL, format=schema)
    assert next(stand_in.bodies("/api/chat"))["format"] == schema


def test_num_ctx_above_the_loaded_context_is_refused(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=SMOL, messages=CAPITAL, options={"num_ctx": 4096})
    assert caught.value.status_code == 400
    assert "num_ctx" in caught.value.error
    fits = client.chat(model=SMOL, messages=CAPITAL, options={**GREEDY, "num_ctx": 2048, "num_predict": 2})
    assert fits.done


# Embeddings


def test_embed_and_embeddings(client: ollama.Client) -> None:
    result = client.embed(model=SMOL, input=["The sky is blue.", "Grass is green."])
    assert len(result.embeddings) == 2
    assert all(len(vector) == 576 for vector in result.embeddings)
    assert math.isclose(math.fsum(v * v for v in result.embeddings[0]), 1.0, rel_tol=1e-3)
    assert result.prompt_eval_count is not None and result.prompt_eval_count > 4
    assert result.total_duration is not None and result.total_duration > 0
    single = client.embed(model=f"{SMOL}:latest", input="The sky is blue.")
    older = client.embeddings(model=SMOL, prompt="The sky is blue.")
    assert len(single.embeddings) == 1
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(single.embeddings[0], older.embedding, strict=True))
    routed = client.embed(model="llama3.2", input=["a", "b"])
    assert [len(vector) for vector in routed.embeddings] == [8, 8]


# keep_alive


def runner_pids(front: Server) -> dict[str, int]:
    engine = front.engine_health()["engine"]
    assert isinstance(engine, dict)
    runners = engine["runners"]
    return {runner["model"]: runner["pid"] for runner in runners}


def running(client: ollama.Client) -> dict[str, Any]:
    return {model.model: model for model in client.ps().models}


def wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_keep_alive_loads_and_unloads(client: ollama.Client, front: Server) -> None:
    loaded = client.generate(model=SMOL, keep_alive="10m")
    assert (loaded.done, loaded.done_reason) == (True, "load")
    model = running(client)[f"{SMOL}:latest"]
    assert model.expires_at is not None
    assert timedelta(minutes=9) < model.expires_at - datetime.now(UTC) <= timedelta(minutes=10)
    assert model.context_length == 2048
    client.chat(model=SMOL, messages=[], keep_alive=-1)
    assert running(client)[f"{SMOL}:latest"].expires_at.year > 2300
    pid = runner_pids(front)[SMOL]
    unloaded = client.chat(model=SMOL, messages=[], keep_alive=0)
    assert (unloaded.done, unloaded.done_reason) == (True, "unload")
    assert f"{SMOL}:latest" not in running(client)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # keep_alive 0 with a prompt unloads once the reply is done.
    reply = client.generate(model=SMOL, prompt="Hi", keep_alive=0, options={"num_predict": 2})
    assert reply.load_duration > 0  # it loaded again for this request
    wait_for(lambda: f"{SMOL}:latest" not in running(client))


def test_embed_and_embeddings_keep_the_model_as_asked(client: ollama.Client) -> None:
    client.embed(model=SMOL, input="The sky is blue.", keep_alive="10m")
    expires_at = running(client)[f"{SMOL}:latest"].expires_at
    assert expires_at is not None
    assert timedelta(minutes=9) < expires_at - datetime.now(UTC) <= timedelta(minutes=10)
    client.embeddings(model=SMOL, prompt="The sky is blue.", keep_alive=0)
    wait_for(lambda: f"{SMOL}:latest" not in running(client))


# Routed to an Ollama upstream and to another locopilot


def test_routed_to_ollama_with_the_latest_tag(client: ollama.Client, stand_in: OllamaStandIn) -> None:
    stand_in.requests.clear()
    stand_in.load_duration = 250_000_000
    try:
        reply = client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], options={"temperature": 0.3, "seed": 5}
        )
    finally:
        stand_in.load_duration = 0
    assert reply.message.content == SENTENCE
    assert reply.model == "llama3.2"
    assert reply.load_duration == 250_000_000  # the upstream's own, passed through
    sent = next(stand_in.bodies("/api/chat"))
    assert sent["model"] == "llama3.2:latest"
    assert (sent["options"]["temperature"], sent["options"]["seed"]) == (0.3, 5)
    parts = list(client.generate(model="qwen2.5:0.5b", prompt="hi there", options={"num_predict": 3}, stream=True))
    assert "".join(part.response or "" for part in parts) == "Hello from the"
    assert parts[-1].done_reason == "length"
    assert parts[-1].eval_count == 3


def test_routed_to_another_locopilot(client: ollama.Client) -> None:
    reply = client.chat(model=PEER, messages=CAPITAL, options=GREEDY)
    assert "Paris" in (reply.message.content or "")
    assert reply.eval_count > 0
    streamed = list(client.generate(model=f"{PEER}:latest", prompt="Hello", stream=True, options={"num_predict": 3}))
    assert streamed[-1].done_reason == "length"


def test_an_upstream_error_mid_stream_is_an_error_line(client: ollama.Client, stand_in: OllamaStandIn) -> None:
    stand_in.error_after = (2, "runner crashed")
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            for _ in client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True):
                pass
    finally:
        stand_in.error_after = None
    assert "runner crashed" in caught.value.error


# Errors in Ollama's shape


def tool(name: str, kind: str = "object") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": kind, "properties": {}}}}


@pytest.mark.parametrize(
    ("route", "body", "status", "fragment"),
    [
        ("/api/chat", {"model": "no-such-model", "messages": CAPITAL}, 404, "no-such-model"),
        ("/api/generate", {"model": "no-such-model", "prompt": "hi"}, 404, "no-such-model"),
        ("/api/embed", {"model": "no-such-model", "input": "hi"}, 404, "no-such-model"),
        ("/api/chat", {"messages": CAPITAL}, 400, "model"),
        ("/api/chat", {"model": SMOL, "messages": CAPITAL, "options": {"temperature": "hot"}}, 400, "temperature"),
        ("/api/chat", {"model": SMOL, "messages": [{"role": "king", "content": "x"}]}, 400, "role"),
        ("/api/chat", {"model": SMOL, "messages": CAPITAL, "format": "xml"}, 400, "format"),
        ("/api/chat", {"model": SMOL, "messages": CAPITAL, "keep_alive": "soon"}, 400, "duration"),
        ("/api/chat", {"model": SMOL, "messages": CAPITAL, "think": True}, 400, "thinking"),
        ("/api/chat", {"model": SMOL, "messages": CAPITAL, "tools": [tool("bad name")]}, 400, "tool name"),
        ("/api/chat", {"model": SMOL, "messages": CAPITAL, "tools": [tool("f", "array")]}, 400, '"type": "object"'),
        ("/api/chat", {"model": SMOL, "messages": CAPITAL, "tools": [tool("f"), tool("f")]}, 400, "twice"),
        ("/api/generate", {"model": SMOL, "prompt": "hi", "template": "{{ .Prompt }}"}, 400, "template"),
        ("/api/generate", {"model": SMOL, "prompt": "hi", "context": [1, 2, 3]}, 400, "context"),
        ("/api/generate", {"model": SMOL, "prompt": "hi", "raw": True, "system": "x"}, 400, "system"),
        ("/api/embed", {"model": SMOL, "input": ["a", ""]}, 400, "input"),
        ("/api/show", {}, 400, "model"),
        ("/api/delete", {"model": "no-such-model"}, 404, "no-such-model"),
        ("/api/copy", {"source": "no-such-model", "destination": "x"}, 404, "no-such-model"),
        ("/api/pull", {"model": "../escape"}, 400, "escape"),
    ],
)
def test_errors_have_ollamas_shape(front: Server, route: str, body: dict[str, Any], status: int, fragment: str) -> None:
    method = "DELETE" if route == "/api/delete" else "POST"
    response = httpx.request(method, f"{front.url}{route}", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error"}
    assert isinstance(error["error"], str) and fragment in error["error"]


def test_the_client_raises_response_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=CAPITAL)
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.generate(model=SMOL, prompt="hi", template="{{ .Prompt }}", stream=True))
    assert caught.value.status_code == 400


def test_malformed_json_is_400_in_ollamas_shape(front: Server) -> None:
    response = httpx.post(f"{front.url}/api/chat", content=b"{not json", timeout=10)
    assert response.status_code == 400
    assert isinstance(response.json()["error"], str)


# Copy and delete


def test_copy_makes_an_alias_and_delete_removes_it(client: ollama.Client, front: Server) -> None:
    assert client.copy(SMOL, "smol-alias:latest").status == "success"
    names = {model.model for model in client.list().models}
    assert {"smol-alias:latest", f"{SMOL}:latest"} <= names
    assert (front.models_dir / "smol-alias.gguf").is_symlink()
    assert client.show("smol-alias").details.family == "llama"  # type: ignore[union-attr]
    assert client.delete("smol-alias").status == "success"
    names = {model.model for model in client.list().models}
    assert "smol-alias:latest" not in names and f"{SMOL}:latest" in names
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete("smol-alias")
    assert caught.value.status_code == 404


# The request log and metrics name the API


def test_the_request_log_and_metrics_name_the_ollama_api(client: ollama.Client, front: Server) -> None:
    client.chat(model=SMOL, messages=CAPITAL, options={"num_predict": 2})
    client.generate(model=SMOL, prompt="Hi", options={"num_predict": 2})
    client.embed(model=SMOL, input="Hi")

    def logged() -> set[str]:
        with sqlite3.connect(front.db_path) as conn:
            return {row[0] for row in conn.execute("SELECT endpoint FROM inference_logs")}

    wait_for(lambda: {"ollama.chat", "ollama.generate", "ollama.embed"} <= logged())
    metrics = httpx.get(f"{front.url}/metrics", timeout=10).text
    assert 'route="/api/chat"' in metrics and 'route="/api/embed"' in metrics


# The pieces, alone


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        (30, 30.0),
        (-1, -1.0),
        ("0", 0.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("300ms", 0.3),
        ("-1", -1.0),
        ("-5m", -1.0),
        ("45", 45.0),
    ],
)
def test_keep_alive_reads_as_ollama_does(value: float | str | None, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 m", "m", "", "1x", True])
def test_keep_alive_refuses_what_is_no_duration(value: str | bool) -> None:
    with pytest.raises(InvalidRequest) as caught:
        keep_alive_seconds(value)
    assert caught.value.param == "keep_alive"


def test_a_name_without_a_tag_is_its_latest() -> None:
    names = ["llama3.2:latest", "qwen2.5:0.5b", "smol"]
    assert served_name("llama3.2", names) == "llama3.2:latest"
    assert served_name("llama3.2:latest", names) == "llama3.2:latest"
    assert served_name("smol:latest", names) == "smol"
    assert served_name("qwen2.5", names) is None
    assert served_name("llama3.2:1b", names) is None


# /api/show of a model an upstream serves


def test_show_asks_an_ollama_upstream_under_its_name(
    client: ollama.Client, stand_in: OllamaStandIn, front: Server
) -> None:
    stand_in.requests.clear()
    for name in ("llama3.2", "ollama:llama3.2:latest"):
        shown = client.show(name)
        assert shown.details is not None
        assert (shown.details.family, shown.details.parameter_size) == ("llama", "1.2B")
        assert shown.details.quantization_level == "Q4_K_M"
        assert shown.modelinfo is not None
        assert shown.modelinfo["llama.context_length"] == CONTEXT_LENGTH
        assert shown.modelinfo["tokenizer.ggml.tokens"] == []
        assert shown.template == TEMPLATE
        assert shown.capabilities == ["completion", "tools"]
        assert shown.license == LICENSE
        assert shown.parameters is not None and '"<|eot_id|>"' in shown.parameters
        # The upstream's modelfile names a path on its disk; this one names the model as the client did.
        assert shown.modelfile is not None and f"FROM {name}\n" in shown.modelfile
        assert "/root/.ollama" not in shown.modelfile
    assert [body["model"] for body in stand_in.bodies("/api/show")] == ["llama3.2:latest"] * 2
    assert client.show("qwen3:0.6b").capabilities == ["completion", "tools", "thinking"]
    raw = httpx.post(f"{front.url}/api/show", json={"model": "llama3.2"}, timeout=30)
    assert raw.headers["x-locopilot-provider"] == "ollama"
    assert raw.json()["tensors"][0]["name"] == "token_embd.weight"
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("ollama:no-such-model")
    assert caught.value.status_code == 404


def test_show_of_an_openai_upstreams_model_gives_what_its_list_says(client: ollama.Client) -> None:
    """The peer is a locopilot: its /v1/models entry names the architecture, size, quantization,
    context and how it calls tools; nothing it does not say (a template, a license) is made up."""
    shown = client.show(PEER)
    assert shown.details is not None
    assert (shown.details.family, shown.details.quantization_level) == ("llama", "Q4_1")
    assert shown.details.parameter_size == "134.52M"
    assert shown.details.format == ""
    assert shown.modelinfo == {
        "general.architecture": "llama",
        "llama.context_length": 8192,
        "general.parameter_count": shown.modelinfo["general.parameter_count"],
    }
    assert shown.modelinfo["general.parameter_count"] > 100_000_000
    assert shown.capabilities == ["completion", "tools"]
    assert not shown.template
    assert shown.license is None


# keep_alive, logprobs and think through each kind of backend


def test_keep_alive_loads_and_unloads_on_an_ollama_upstream(client: ollama.Client, stand_in: OllamaStandIn) -> None:
    stand_in.requests.clear()
    stand_in.loaded.clear()
    loaded = client.generate(model="llama3.2", keep_alive="10m")
    assert (loaded.done, loaded.done_reason) == (True, "load")
    assert next(stand_in.bodies("/api/generate"))["keep_alive"] == 600
    assert 590 < stand_in.loaded["llama3.2:latest"] - time.time() <= 600
    unloaded = client.chat(model="llama3.2", messages=[], keep_alive=0)
    assert (unloaded.done, unloaded.done_reason) == (True, "unload")
    assert "llama3.2:latest" not in stand_in.loaded
    # With something to generate, keep_alive goes along with it.
    client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], keep_alive=-1)
    assert next(stand_in.bodies("/api/chat"))["keep_alive"] == -1
    assert stand_in.loaded["llama3.2:latest"] == math.inf
    client.generate(model="qwen2.5:0.5b", prompt="hi", keep_alive="1h30m")  # sent to /api/chat, templated there
    assert [body.get("keep_alive") for body in stand_in.bodies("/api/chat")][-1] == 5400
    client.embed(model="qwen2.5:0.5b", input=[], keep_alive=0)
    assert "qwen2.5:0.5b" not in stand_in.loaded
    assert next(stand_in.bodies("/api/embed")) == {"model": "qwen2.5:0.5b", "input": [], "keep_alive": 0}


def test_logprobs_from_the_embedded_engine(client: ollama.Client, front: Server) -> None:
    reply = client.generate(model=SMOL, prompt=CAPITAL[0]["content"], logprobs=True, top_logprobs=3, options=GREEDY)
    assert reply.logprobs is not None and len(reply.logprobs) == reply.eval_count
    assert "".join(each.token for each in reply.logprobs) == reply.response
    for each in reply.logprobs:
        assert each.logprob <= 0
        assert each.top_logprobs is not None and len(each.top_logprobs) == 3
        # Greedy: the chosen token heads its own alternatives.
        assert each.top_logprobs[0].token == each.token
        assert each.top_logprobs[0].logprob == pytest.approx(each.logprob)
    parts = list(client.chat(model=SMOL, messages=CAPITAL, logprobs=True, stream=True, options=GREEDY))
    streamed = [each for part in parts for each in part.logprobs or []]
    assert "".join(each.token for each in streamed) == "".join(part.message.content or "" for part in parts)
    assert [each.token for each in streamed] == [each.token for each in reply.logprobs]
    assert all(not each.top_logprobs for each in streamed)
    raw = httpx.post(
        f"{front.url}/api/chat",
        json={"model": SMOL, "messages": CAPITAL, "stream": False, "logprobs": True, "options": GREEDY},
        timeout=120,
    ).json()
    first = raw["logprobs"][0]
    assert set(first) == {"token", "logprob", "bytes"}
    assert first["bytes"] == list(first["token"].encode())
    plain = httpx.post(
        f"{front.url}/api/chat",
        json={"model": SMOL, "messages": CAPITAL, "stream": False, "options": GREEDY},
        timeout=120,
    ).json()
    assert "logprobs" not in plain


def test_logprobs_through_an_ollama_upstream(client: ollama.Client, stand_in: OllamaStandIn) -> None:
    stand_in.requests.clear()
    whole = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2)
    sent = next(stand_in.bodies("/api/chat"))
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    assert whole.logprobs is not None
    assert [each.token for each in whole.logprobs] == SENTENCE.replace(" ", "\0 ").split("\0")
    assert [each.logprob for each in whole.logprobs][:2] == [-0.125, -0.25]
    assert [top.token for top in whole.logprobs[0].top_logprobs or []] == ["Hello", " alt1"]
    parts = list(client.generate(model="llama3.2", prompt="hi", logprobs=True, stream=True))
    assert [each.token for part in parts for each in part.logprobs or []] == [part.response for part in parts[:-1]]


def test_top_logprobs_out_of_range_is_refused(front: Server) -> None:
    for model in (SMOL, "llama3.2"):
        body = {"model": model, "prompt": "hi", "logprobs": True, "top_logprobs": 21}
        response = httpx.post(f"{front.url}/api/generate", json=body, timeout=30)
        assert response.status_code == 400
        assert response.json() == {"error": "top_logprobs must be between 0 and 20"}


def test_think_through_an_ollama_upstream(client: ollama.Client, stand_in: OllamaStandIn) -> None:
    stand_in.requests.clear()
    hi = [{"role": "user", "content": "hi"}]
    reply = client.chat(model="qwen3:0.6b", messages=hi, think=True)
    assert (reply.message.thinking, reply.message.content) == (THOUGHT, SENTENCE)
    assert next(stand_in.bodies("/api/chat"))["think"] is True
    parts = list(client.chat(model="qwen3:0.6b", messages=hi, think="high", stream=True))
    assert "".join(part.message.thinking or "" for part in parts) == THOUGHT
    assert "".join(part.message.content or "" for part in parts) == SENTENCE
    generated = client.generate(model="qwen3:0.6b", prompt="hi", think=True)
    assert (generated.thinking, generated.response) == (THOUGHT, SENTENCE)
    # Told not to think, or not told (the OpenAI-style answer: no reasoning in the reply), it answers alone.
    for think in (False, None):
        quiet = client.chat(model="qwen3:0.6b", messages=hi, think=think)
        assert (quiet.message.thinking, quiet.message.content) == (None, SENTENCE)
    assert [body.get("think") for body in stand_in.bodies("/api/chat")][-2:] == [False, None]
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3.2", messages=hi, think=True)
    assert caught.value.status_code == 400
    assert caught.value.error == '"llama3.2:latest" does not support thinking'


@pytest.mark.parametrize("model", [SMOL, PEER])
def test_think_is_refused_where_it_cannot_be_passed_on(front: Server, model: str) -> None:
    for route, body in (
        ("/api/chat", {"messages": CAPITAL}),
        ("/api/generate", {"prompt": "hi"}),
    ):
        response = httpx.post(f"{front.url}{route}", json={"model": model, "think": True, **body}, timeout=30)
        assert response.status_code == 400
        assert response.json() == {"error": f'"{model}" does not support thinking'}
    fine = httpx.post(
        f"{front.url}/api/generate",
        json={"model": model, "prompt": "hi", "think": False, "stream": False, "options": {"num_predict": 2}},
        timeout=120,
    )
    assert fine.status_code == 200 and "thinking" not in fine.json()
    bad = httpx.post(f"{front.url}/api/generate", json={"model": model, "prompt": "hi", "think": "hard"}, timeout=30)
    assert bad.status_code == 400
    assert bad.json()["error"].startswith('invalid think value: "hard"')


def test_what_a_model_list_entry_says_and_no_more() -> None:
    """vLLM's and llama-server's /v1/models entries, and a cloud's that says nothing but its id."""
    vllm = described({"id": "Qwen/Qwen2.5-0.5B", "object": "model", "created": 1700000000, "max_model_len": 32768})
    assert vllm.model_info == {}  # a context length, but no architecture to key it by
    assert (vllm.family, vllm.capabilities, vllm.modified_at) == (None, ("completion",), "2023-11-14T22:13:20Z")
    meta = {"vocab_type": 2, "n_vocab": 49152, "n_ctx_train": 8192, "n_embd": 576, "n_params": 134515008}
    llama_server = described({"id": "smol.gguf", "object": "model", "created": 0, "meta": meta})
    assert llama_server.parameter_size == "134.52M"
    assert llama_server.model_info == {"general.parameter_count": 134515008}
    assert (llama_server.template, llama_server.modified_at) == (None, None)
    assert described({"id": "gpt-x"}) == ModelDescription(capabilities=("completion",))
