"""Keys, scopes, model allowlists, the privacy pin and header, and quotas on Anthropic's routes,
driven by the official ``anthropic`` client against the keyed ``secured`` server (behind it:
``cloud``, remote, and ``lan``, local, scripted OpenAI-compatible upstreams).

The same keys work as ``Authorization: Bearer`` (what the client sends for ``api_key``) and as
``x-api-key`` (what Anthropic's API documents); every refusal is the client's own exception class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from tests.conftest import Server
from tests.fakes.fault_upstream import FaultUpstream
from tests.security.conftest import Key, create_key

HI: list[Any] = [{"role": "user", "content": "hi"}]
REPLY = "".join(FaultUpstream.WORDS)


def generations(upstream: FaultUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/v1/chat/completions")


@pytest.fixture
def clients() -> Iterator[list[anthropic.Anthropic]]:
    made: list[anthropic.Anthropic] = []
    yield made
    for client in made:
        client.close()


def by_bearer(server: Server, clients: list[anthropic.Anthropic], secret: str, **kwargs: Any) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=server.url, api_key=secret, max_retries=0, timeout=60, **kwargs)
    clients.append(client)
    return client


def by_x_api_key(server: Server, clients: list[anthropic.Anthropic], secret: str) -> anthropic.Anthropic:
    headers = {"x-api-key": secret}
    client = anthropic.Anthropic(base_url=server.url, api_key=None, default_headers=headers, max_retries=0, timeout=60)
    clients.append(client)
    return client


def test_x_api_key_and_bearer_are_the_same_key(
    secured: Server, lan: FaultUpstream, clients: list[anthropic.Anthropic]
) -> None:
    key = create_key(secured, name="anthropic-user")
    for client in (by_x_api_key(secured, clients, key.secret), by_bearer(secured, clients, key.secret)):
        before = generations(lan)
        raw = client.messages.with_raw_response.create(model="lan-model", max_tokens=8, messages=HI)
        message = raw.parse()
        assert message.content[0].type == "text" and message.content[0].text == REPLY
        assert message.usage.input_tokens == FaultUpstream.PROMPT_TOKENS
        assert raw.headers["x-locopilot-provider"] == "lan"
        assert generations(lan) == before + 1
        with client.messages.stream(model="lan-model", max_tokens=8, messages=HI) as stream:
            assert "".join(stream.text_stream) == REPLY


def test_a_wrong_or_missing_key_is_an_authentication_error(
    secured: Server, lan: FaultUpstream, clients: list[anthropic.Anthropic]
) -> None:
    wrong = "lcp_" + "B" * 43
    before = generations(lan)
    for client in (by_x_api_key(secured, clients, wrong), by_bearer(secured, clients, wrong)):
        with pytest.raises(anthropic.AuthenticationError) as refused:
            client.messages.create(model="lan-model", max_tokens=8, messages=HI)
        assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        assert wrong not in str(refused.value.body)
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.count_tokens(model="lan-model", messages=HI)
    no_key = {"Authorization": anthropic.Omit()}
    missing = anthropic.Anthropic(base_url=secured.url, api_key=None, max_retries=0, default_headers=no_key)
    clients.append(missing)
    with pytest.raises(anthropic.AuthenticationError, match="x-api-key"):
        missing.messages.create(model="lan-model", max_tokens=8, messages=HI)
    assert generations(lan) == before


def test_a_key_without_the_inference_scope_is_a_permission_error(
    secured: Server, clients: list[anthropic.Anthropic]
) -> None:
    key = create_key(secured, name="trainer-only", scopes=["training"])
    for client in (by_x_api_key(secured, clients, key.secret), by_bearer(secured, clients, key.secret)):
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            client.messages.create(model="lan-model", max_tokens=8, messages=HI)
        assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.count_tokens(model="lan-model", messages=HI)


def test_the_model_allowlist(secured: Server, cloud: FaultUpstream, clients: list[anthropic.Anthropic]) -> None:
    key = create_key(secured, name="anthropic-lan-only", models=["lan-model"])
    client = by_x_api_key(secured, clients, key.secret)
    before = generations(cloud)
    with pytest.raises(anthropic.PermissionDeniedError, match="may not use the model"):
        client.messages.create(model="cloud:fault-small", max_tokens=8, messages=HI)
    assert generations(cloud) == before
    assert client.messages.create(model="lan-model", max_tokens=8, messages=HI).content[0].type == "text"


def test_the_privacy_pin_and_header(secured: Server, cloud: FaultUpstream, clients: list[anthropic.Anthropic]) -> None:
    pinned: Key = create_key(secured, name="anthropic-local", privacy="local_only")
    free: Key = create_key(secured, name="anthropic-any")
    before = generations(cloud)
    with pytest.raises(anthropic.PermissionDeniedError, match="local_only"):
        by_x_api_key(secured, clients, pinned.secret).messages.create(
            model="cloud:fault-small", max_tokens=8, messages=HI
        )
    header = {"X-Routing-Privacy": "local_only"}
    with pytest.raises(anthropic.PermissionDeniedError, match="local_only"):
        by_bearer(secured, clients, free.secret).messages.create(
            model="cloud:fault-small", max_tokens=8, messages=HI, extra_headers=header
        )
    with pytest.raises(anthropic.BadRequestError, match="X-Routing-Privacy"):
        by_bearer(secured, clients, free.secret).messages.create(
            model="lan-model", max_tokens=8, messages=HI, extra_headers={"X-Routing-Privacy": "nowhere"}
        )
    assert generations(cloud) == before
    raw = by_bearer(secured, clients, free.secret).messages.with_raw_response.create(
        model="cloud:fault-small", max_tokens=8, messages=HI
    )
    assert raw.headers["x-locopilot-provider"] == "cloud"
    assert generations(cloud) == before + 1


def test_the_requests_quota_is_a_rate_limit_error(
    secured: Server, lan: FaultUpstream, clients: list[anthropic.Anthropic]
) -> None:
    key = create_key(secured, name="anthropic-one-rpm", rpm=1)
    client = by_x_api_key(secured, clients, key.secret)
    assert client.messages.create(model="lan-model", max_tokens=8, messages=HI).content[0].type == "text"
    before = generations(lan)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="lan-model", max_tokens=8, messages=HI)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.response.headers["x-ratelimit-limit-requests"] == "1"
    assert generations(lan) == before
