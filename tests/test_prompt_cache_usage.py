"""Prompt-cache reuse reported as OpenAI's ``usage.prompt_tokens_details.cached_tokens``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.completion_usage import CompletionUsage

from tests.conftest import SMOL, Server, start_server
from tests.test_api import wait_for_log_row

SYSTEM = (
    "You are the librarian of a small town. You know the opening hours (nine to five, closed on Mondays), "
    "the rules for borrowing (three books for three weeks) and where each section is kept."
)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    """A server of its own: on a fresh runner nothing is cached before the first turn."""
    running = start_server(tmp_path_factory, {SMOL: smollm2_path}, {"LOCOPILOT_PARALLEL": "2"})
    yield running
    running.stop()


def cached(usage: CompletionUsage | None) -> int:
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None
    return usage.prompt_tokens_details.cached_tokens


def test_a_second_turn_reports_the_prompt_it_reused(fresh: Server) -> None:
    client = fresh.client()
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "When are you open?"},
    ]
    first = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=8, temperature=0)
    assert cached(first.usage) == 0
    assert first.usage is not None
    row = wait_for_log_row(fresh, first.id)
    assert row["tokens_cached"] == 0

    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "How many books may I borrow?"},
    ]
    second = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=8, temperature=0)
    assert second.usage is not None
    # The whole first turn (system prompt and question) came from the cache.
    assert first.usage.prompt_tokens <= cached(second.usage) < second.usage.prompt_tokens
    assert wait_for_log_row(fresh, second.id)["tokens_cached"] == cached(second.usage)

    # Streamed, the usage chunk says the same.
    messages += [
        {"role": "assistant", "content": second.choices[0].message.content or ""},
        {"role": "user", "content": "Thank you."},
    ]
    chunks = list(
        client.chat.completions.create(
            model=SMOL,
            messages=messages,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert second.usage.prompt_tokens <= cached(chunks[-1].usage) < chunks[-1].usage.prompt_tokens


def test_text_completions_report_cached_tokens_too(fresh: Server) -> None:
    client = fresh.client()
    story = "Chapter one. The librarian opened the heavy door and the morning light fell across the shelves. " * 3
    first = client.completions.create(model=SMOL, prompt=story, max_tokens=4, temperature=0)
    assert first.usage is not None
    assert cached(first.usage) <= 1  # nothing but perhaps a BOS token is shared with the chats before
    second = client.completions.create(model=SMOL, prompt=story + "Then", max_tokens=4, temperature=0)
    assert cached(second.usage) >= first.usage.prompt_tokens - 1
    chunks = list(
        client.completions.create(
            model=SMOL,
            prompt=story + "Later",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert cached(chunks[-1].usage) >= first.usage.prompt_tokens - 1


def test_a_peer_that_reports_cached_tokens_is_passed_through(
    fresh: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An upstream's own ``cached_tokens`` reaches the client (here the upstream is another locopilot)."""
    upstreams = [{"name": "peer", "url": f"{fresh.url}/v1", "locality": "local"}]
    front = start_server(tmp_path_factory, {}, {"LOCOPILOT_UPSTREAMS": json.dumps(upstreams)})
    try:
        client = front.client()
        question: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Where are the atlases kept?"},
        ]
        replies = [
            client.chat.completions.create(model=f"peer:{SMOL}", messages=question, max_tokens=4, temperature=0)
            for _ in range(2)
        ]
        assert replies[1].usage is not None
        assert cached(replies[1].usage) >= replies[1].usage.prompt_tokens - 1
    finally:
        front.stop()
