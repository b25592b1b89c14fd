"""Keys, scopes, the privacy pin, model allowlists and quotas on Ollama's API, with the ``ollama`` client.

The same keys as the OpenAI API, sent as Ollama clients send them (``Authorization: Bearer``
through the client's ``headers``); refusals in Ollama's shape, raised by the client as
``ollama.ResponseError`` with the status. ``cloud`` is remote, ``lan`` local (see conftest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import ollama
import pytest

from tests.conftest import Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import Key, create_key
from tests.security.test_policy import generations, log_rows

HI = [{"role": "user", "content": "hi"}]


Connect = Callable[..., ollama.Client]


@pytest.fixture
def client() -> Iterator[Connect]:
    """``client(server, key, **headers)``: an ollama client sending ``key``, closed after the test."""
    made: list[ollama.Client] = []

    def connect(server: Server, key: Key | None = None, **headers: str) -> ollama.Client:
        made.append(ollama.Client(host=server.url, timeout=30, headers={**(key.headers if key else {}), **headers}))
        return made[-1]

    yield connect
    for each in made:
        each.close()


def refusal(call: object) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_no_key_is_401_in_ollamas_shape(client: Connect, secured: Server) -> None:
    error = refusal(lambda: client(secured).list())
    assert error.status_code == 401
    assert "API key" in error.error
    response = httpx.post(f"{secured.url}/api/chat", json={"model": "lan-model", "messages": HI}, timeout=10)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert isinstance(response.json()["error"], str)
    # The root answers without a key: Ollama clients probe it before anything else.
    assert httpx.get(f"{secured.url}/", timeout=10).text == "Ollama is running"


def test_an_inference_key_chats_lists_and_is_logged(client: Connect, secured: Server, lan: FaultUpstream) -> None:
    key = create_key(secured, name="ollama-inference")
    ollama_client = client(secured, key)
    names = {model.model for model in ollama_client.list().models}
    assert {"lan-model:latest", "fault-small:latest"} <= names
    before = generations(lan)
    reply = ollama_client.chat(model="lan-model", messages=HI)
    assert reply.message.content
    assert reply.done_reason == "stop"
    assert generations(lan) == before + 1
    rows = log_rows(secured, key)
    assert [(row["endpoint"], row["provider"]) for row in rows] == [("ollama.chat", "lan")]


def test_model_routes_need_the_models_scope(client: Connect, secured: Server) -> None:
    key = create_key(secured, name="ollama-no-models")
    ollama_client = client(secured, key)
    for call in (
        lambda: ollama_client.delete("lan-model"),
        lambda: ollama_client.copy("lan-model", "other"),
        lambda: ollama_client.pull("lan-model"),
    ):
        error = refusal(call)
        assert error.status_code == 403
        assert "'models' scope" in error.error


def test_the_allowlist_applies(client: Connect, secured: Server) -> None:
    key = create_key(secured, name="ollama-lan-only", models=["lan-model"])
    ollama_client = client(secured, key)
    assert {model.model for model in ollama_client.list().models} == {"lan-model:latest"}
    error = refusal(lambda: ollama_client.chat(model="fault-small", messages=HI))
    assert error.status_code == 403
    assert ollama_client.chat(model="lan-model:latest", messages=HI).done


def test_the_privacy_pin_keeps_requests_off_the_remote(client: Connect, secured: Server, cloud: FaultUpstream) -> None:
    pinned = create_key(secured, name="ollama-pinned", privacy="local_only")
    before = generations(cloud)
    for headers in ({}, {"X-Routing-Privacy": "any"}):
        error = refusal(lambda h=headers: client(secured, pinned, **h).chat(model="fault-small", messages=HI))
        assert error.status_code == 404
    assert generations(cloud) == before
    unpinned = create_key(secured, name="ollama-unpinned")
    headers = {"X-Routing-Privacy": "local_only"}
    error = refusal(lambda: client(secured, unpinned, **headers).generate(model="fault-small", prompt="hi"))
    assert error.status_code == 404
    assert generations(cloud) == before
    assert client(secured, unpinned).generate(model="fault-small", prompt="hi").done
    assert generations(cloud) == before + 1


def test_a_quota_is_429_in_ollamas_shape(client: Connect, secured: Server) -> None:
    key = create_key(secured, name="ollama-rpm", rpm=1)
    ollama_client = client(secured, key)
    assert ollama_client.chat(model="lan-model", messages=HI).done
    error = refusal(lambda: ollama_client.chat(model="lan-model", messages=HI))
    assert error.status_code == 429
    response = httpx.post(
        f"{secured.url}/api/embed", json={"model": "lan-model", "input": "hi"}, headers=key.headers, timeout=10
    )
    assert response.status_code == 429
    assert response.headers["retry-after"]
    assert isinstance(response.json()["error"], str)
