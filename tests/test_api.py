"""The OpenAI-compatible API, driven with the official openai client against a real server."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from pathlib import Path

import apsw
import gguf
import httpx
import openai
import pytest

from tests.conftest import GEMMA, SMOL, SMOLLM2, Server, start_server

CAPITAL = [{"role": "user", "content": "Which city is the capital of France?"}]


def chat_text(client: openai.OpenAI, **kwargs: object) -> str:
    reply = client.chat.completions.create(model=SMOL, **kwargs)  # type: ignore[call-overload]
    content = reply.choices[0].message.content
    assert isinstance(content, str)
    return content


def log_rows(server: Server, where: str, *params: object) -> list[dict[str, object]]:
    """Request log rows, read from the server's database file as another process would."""
    conn = apsw.Connection(str(server.db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        cursor = conn.cursor()
        cursor.row_trace = lambda c, row: dict(zip((d[0] for d in c.getdescription()), row, strict=True))
        return list(cursor.execute(f"SELECT * FROM inference_logs WHERE {where}", params))
    finally:
        conn.close()


def log_row(server: Server, request_id: str) -> dict[str, object]:
    rows = log_rows(server, "request_id = ?", request_id)
    assert len(rows) == 1, rows
    return rows[0]


def wait_for_log_row(server: Server, request_id: str, attempts: int = 100) -> dict[str, object]:
    """The row, once the server's writer thread has committed it."""
    for _ in range(attempts):
        try:
            return log_row(server, request_id)
        except AssertionError:
            time.sleep(0.05)
    return log_row(server, request_id)


# Models


def test_models_list_has_every_gguf(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {SMOL, GEMMA}
    smol = models[SMOL].model_dump()
    assert smol["owned_by"] == "locopilot"
    assert smol["quantization"] == "Q4_1"
    assert smol["architecture"] == "llama"
    assert smol["context_length"] == 8192
    assert smol["size_bytes"] > 90_000_000
    assert smol["chat_template"] == "gguf"
    assert models[GEMMA].model_dump()["chat_template"] == "gemma"


def test_model_retrieve_and_not_found(client: openai.OpenAI) -> None:
    assert client.models.retrieve(GEMMA).model_dump()["quantization"] == "Q4_K_M"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


# Chat


def test_chat_answers_a_simple_question(client: openai.OpenAI) -> None:
    assert "Paris" in chat_text(client, messages=CAPITAL, temperature=0, max_tokens=30)


def test_chat_reply_shape_and_headers(client: openai.OpenAI, server: Server) -> None:
    raw = client.chat.completions.with_raw_response.create(model=SMOL, messages=CAPITAL, temperature=0, max_tokens=4)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-locopilot-provider"] == "embedded"
    assert raw.headers["x-locopilot-model"] == SMOL
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.id == raw.headers["x-request-id"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4
    row = wait_for_log_row(server, reply.id)
    assert row["status"] == "ok"
    assert row["http_status"] == 200
    assert row["model"] == SMOL
    assert row["provider"] == "embedded"
    assert row["tokens_in"] == reply.usage.prompt_tokens
    assert row["tokens_out"] == 4
    assert row["ttfb_ms"] is not None
    assert row["latency_ms"] >= row["ttfb_ms"]  # type: ignore[operator]


def test_streaming_matches_non_streaming_and_reports_usage(client: openai.OpenAI) -> None:
    whole = chat_text(client, messages=CAPITAL, temperature=0, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model=SMOL,
            messages=CAPITAL,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_field(server: Server) -> None:
    body = {"model": SMOL, "messages": CAPITAL, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in event for event in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_reproduces(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Write a short poem about the sea."}]
    first = chat_text(client, messages=prompt, temperature=1.0, seed=1234, max_tokens=30)
    second = chat_text(client, messages=prompt, temperature=1.0, seed=1234, max_tokens=30)
    other = [chat_text(client, messages=prompt, temperature=1.0, seed=s, max_tokens=30) for s in (1, 2, 3)]
    assert first == second
    assert any(text != first for text in other)


def test_stop_strings_end_the_reply(client: openai.OpenAI) -> None:
    text = chat_text(
        client, messages=[{"role": "user", "content": "Count from 1 to 10."}], temperature=0, max_tokens=60
    )
    assert "3" in text
    reply = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Count from 1 to 10."}],
        temperature=0,
        max_tokens=60,
        stop=["3"],
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == text[: text.index("3")]
    assert reply.choices[0].model_extra == {"stop_reason": "3"}  # vLLM's extension: which stop string


def test_logit_bias_bans_a_token(client: openai.OpenAI) -> None:
    # The model answers "The capital of France is Paris."; forbid " Paris" (and "Paris") by id.
    plain = chat_text(client, messages=CAPITAL, temperature=0, max_tokens=12)
    assert "Paris" in plain
    banned = {str(t): -100.0 for t in _token_ids(" Paris") + _token_ids("Paris")}
    biased = chat_text(client, messages=CAPITAL, temperature=0, max_tokens=12, logit_bias=banned)
    assert "Paris" not in biased


def _token_ids(text: str) -> list[int]:
    """The id of the single token spelling ``text``, from the model file's vocabulary (GPT-2 style, Ġ for space)."""
    reader = gguf.GGUFReader(SMOLLM2)
    field = reader.fields["tokenizer.ggml.tokens"]
    wanted = text.replace(" ", "Ġ")
    ids = [i for i, part in enumerate(field.data) if bytes(field.parts[part]).decode() == wanted]
    assert ids, f"{text!r} is not a single token"
    return ids


def test_json_object_response_format(client: openai.OpenAI) -> None:
    text = chat_text(
        client,
        messages=[{"role": "user", "content": "Return a JSON object with the capital of France."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=100,
    )
    assert isinstance(json.loads(text), dict)


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        # A bound on the string keeps this 135M model from writing an essay inside it.
        "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    text = chat_text(
        client,
        messages=CAPITAL,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        temperature=0,
        max_tokens=100,
    )
    data = json.loads(text)
    assert set(data) == {"city", "population"}
    assert isinstance(data["city"], str)
    assert isinstance(data["population"], int)


def test_fallback_template_for_a_model_without_one(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=10
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 3


def test_default_model_alias(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="default", messages=CAPITAL, temperature=0, max_tokens=5)
    assert reply.model == "default"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 5


# Completions


def test_text_completion_is_not_wrapped_as_chat(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=SMOL, prompt="The capital of France is", temperature=0, max_tokens=5)
    assert completion.object == "text_completion"
    assert completion.choices[0].text.strip().startswith("Paris")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 5


def test_text_completion_defaults_to_16_tokens(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=SMOL, prompt="Once upon a time", temperature=0)
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 16
    if completion.choices[0].finish_reason == "length":
        assert completion.usage.completion_tokens == 16


def test_text_completion_stream_and_echo(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=SMOL, prompt="One, two, three,", temperature=0, max_tokens=10)
    streamed = client.completions.create(
        model=SMOL, prompt="One, two, three,", temperature=0, max_tokens=10, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    assert text == whole.choices[0].text
    echoed = client.completions.create(model=SMOL, prompt="One, two, three,", temperature=0, max_tokens=10, echo=True)
    assert echoed.choices[0].text == "One, two, three," + whole.choices[0].text


def test_completion_refuses_what_it_does_not_support(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SMOL, prompt="x", suffix="y")
    assert info.value.param == "suffix"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SMOL, prompt=[1, 2, 3])
    assert info.value.param == "prompt"


# Embeddings


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=SMOL, input=["a cat", "a dog", "a cat"], encoding_format="float")
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2]
    assert len(vectors[0]) == 576  # SmolLM2-135M's embedding length
    assert math.isclose(math.sqrt(sum(v * v for v in vectors[0])), 1.0, rel_tol=1e-3)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert result.usage.prompt_tokens > 0
    raw = httpx.post(
        f"{client.base_url}embeddings",
        json={"model": SMOL, "input": "a cat", "encoding_format": "base64"},
        timeout=60,
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert list(decoded) == pytest.approx(vectors[0], abs=1e-5)


def test_embeddings_single_string(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=SMOL, input="hello")
    assert len(result.data) == 1


def test_embeddings_refuse_bad_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=SMOL, input="")
    assert info.value.param == "input"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=SMOL, input=[[1, 2, 3]])


# Errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 5}, "n"),  # more choices than the model's 4 slots
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"logprobs": 3}, "logprobs"),  # a number is for text completions; chat says true
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -5}, "seed"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),
    ],
)
def test_bad_chat_requests_are_400_with_param(server: Server, body: dict[str, object], param: str) -> None:
    request = {"model": SMOL, "messages": CAPITAL, **body}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_refused_requests_are_logged(server: Server) -> None:
    marker = "x" * 7 + "-refused-model"
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": marker, "messages": CAPITAL}, timeout=30)
    assert response.status_code == 404
    refused = wait_for_rows(server, "model = ? AND http_status = 404 AND status = 'error'", marker)
    assert refused[0]["provider"] == ""  # nothing served it
    before = len(log_rows(server, "http_status = 400 AND endpoint = 'completions'"))
    bad = httpx.post(f"{server.url}/v1/completions", json={"model": SMOL, "prompt": 5}, timeout=30)
    assert bad.status_code == 400
    assert wait_for_rows(server, "http_status = 400 AND endpoint = 'completions'", minimum=before + 1)


def wait_for_rows(server: Server, where: str, *params: object, minimum: int = 1) -> list[dict[str, object]]:
    for _ in range(100):
        rows = log_rows(server, where, *params)
        if len(rows) >= minimum:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {minimum} rows where {where}")


@pytest.mark.parametrize(
    ("response_format", "fragment"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 10**8}}},
            "minLength",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "grammar"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "required"),
    ],
)
def test_unusable_json_schemas_are_400(server: Server, response_format: dict[str, object], fragment: str) -> None:
    body = {"model": SMOL, "messages": CAPITAL, "max_tokens": 5, "response_format": response_format}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["param"].startswith("response_format")


def test_malformed_json_is_400(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_wrong_method(server: Server) -> None:
    missing = httpx.get(f"{server.url}/v1/nothing-here", timeout=10)
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong = httpx.get(f"{server.url}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_unknown_model_is_404_and_logged(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=CAPITAL)
    assert info.value.code == "model_not_found"


def test_model_name_cannot_address_a_path(server: Server) -> None:
    for name in ("../etc/passwd", "/etc/passwd", "a/../../b", ".hidden"):
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json={"model": name, "messages": CAPITAL}, timeout=10
        )
        assert response.status_code in (400, 404), name
        assert response.json()["error"]["code"] in ("invalid_model_name", "model_not_found")


def test_prompt_over_the_context_is_refused_not_truncated(client: openai.OpenAI, server: Server) -> None:
    long_prompt = "hello " * 3000
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": long_prompt}], max_tokens=5)
    assert info.value.code == "context_length_exceeded"
    assert "2048" in info.value.message
    assert wait_for_rows(server, "http_status = 400 AND error LIKE '%context length%'")


def test_body_over_the_limit_is_413(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> None:
    small = start_server(tmp_path_factory, {SMOL: smollm2_path}, {"LOCOPILOT_MAX_BODY_BYTES": "2048"})
    try:
        response = httpx.post(
            f"{small.url}/v1/chat/completions",
            json={"model": SMOL, "messages": [{"role": "user", "content": "x" * 4096}]},
            timeout=30,
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
    finally:
        small.stop()


# Health


def test_stats_count_requests_by_provider_model_and_error(client: openai.OpenAI, server: Server) -> None:
    client.chat.completions.create(model=SMOL, messages=CAPITAL, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="stats-missing", messages=CAPITAL)
    wait_for_rows(server, "model = 'stats-missing'")
    window = httpx.get(f"{server.url}/v1/engine/stats", timeout=30).json()["since_start"]
    # Requests for SMOL refused before any provider served them count under provider "".
    (smol,) = [row for row in window["by_provider_model"] if (row["provider"], row["model"]) == ("embedded", SMOL)]
    assert smol["ok"] >= 1
    assert smol["tokens_out"] >= 2
    assert any(e["http_status"] == 404 and "stats-missing" in e["error"] for e in window["errors"])
    assert window["requests"] >= smol["requests"] + 1


def test_health_and_engine_health(server: Server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    health = server.engine_health()
    assert health["status"] == "ok"
    engine = health["engine"]
    assert isinstance(engine, dict)
    assert engine["ready"] is True
    assert engine["llama_cpp_version"]
    assert engine["devices"]
    # The CPU library ggml chose: the development build has one (variant null), the
    # portable build one per instruction-set level, named by it.
    cpu = engine["cpu"]
    assert cpu["library"].startswith("libggml-cpu")
    assert cpu["variant"] is None or cpu["library"] == f"libggml-cpu-{cpu['variant']}.so"
    assert cpu["features"]


def test_engine_health_is_503_when_llama_cpp_does_not_load(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    broken = tmp_path_factory.mktemp("broken")
    (broken / "llama_cpp").mkdir()
    (broken / "llama_cpp" / "__init__.py").write_text("raise ImportError('this llama.cpp is broken')\n")
    server = Server(tmp_path_factory.mktemp("server"), {SMOL: smollm2_path}, {"PYTHONPATH": str(broken)})
    server.start(path="/health")
    try:
        for _ in range(300):
            health = httpx.get(f"{server.url}/v1/engine/health", timeout=10)
            if health.json()["engine"]["detail"] != "starting":
                break
            time.sleep(0.1)
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unavailable"
        assert body["database"]["ok"] is True
        assert "this llama.cpp is broken" in body["engine"]["detail"]
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json={"model": SMOL, "messages": CAPITAL}, timeout=60
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
    finally:
        server.stop()
