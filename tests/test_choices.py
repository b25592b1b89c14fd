"""``n`` > 1 on the embedded engine: choices that share the prompt's KV cache, streamed with ``index``."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from tests.conftest import SMOL, Server

SEA = [{"role": "user", "content": "Write a short poem about the sea."}]


def choice_texts(reply: openai.types.chat.ChatCompletion) -> list[str]:
    assert [choice.index for choice in reply.choices] == list(range(len(reply.choices)))
    return [choice.message.content or "" for choice in reply.choices]


def test_greedy_choices_are_all_the_same(client: openai.OpenAI) -> None:
    alone = client.chat.completions.create(model=SMOL, messages=SEA, temperature=0, max_tokens=12)
    reply = client.chat.completions.create(model=SMOL, messages=SEA, temperature=0, max_tokens=12, n=3)
    assert choice_texts(reply) == [alone.choices[0].message.content] * 3
    assert [choice.finish_reason for choice in reply.choices] == ["length"] * 3
    assert reply.usage is not None and alone.usage is not None
    # The prompt counts once; every choice's tokens count.
    assert reply.usage.prompt_tokens == alone.usage.prompt_tokens
    assert reply.usage.completion_tokens == 3 * alone.usage.completion_tokens


def test_seeded_choices_differ_and_choice_i_samples_with_seed_plus_i(client: openai.OpenAI) -> None:
    def ask(n: int, seed: int) -> list[str]:
        reply = client.chat.completions.create(model=SMOL, messages=SEA, temperature=1.0, seed=seed, max_tokens=16, n=n)
        return choice_texts(reply)

    texts = ask(3, 40)
    assert len(set(texts)) == 3, texts
    assert ask(3, 40) == texts
    assert ask(1, 41) == texts[1:2]
    assert ask(1, 42) == texts[2:3]


def test_streamed_choices_come_with_their_index(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=SMOL, messages=SEA, temperature=1.0, seed=7, max_tokens=16, n=2)
    stream = client.chat.completions.create(
        model=SMOL,
        messages=SEA,
        temperature=1.0,
        seed=7,
        max_tokens=16,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    roles: list[int] = []
    finished: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.append(choice.index)
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == choice_texts(whole)
    assert roles == [0, 1]
    assert finished == {0: "length", 1: "length"}
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_completion_choices_streamed_with_logprobs(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    whole = client.completions.create(model=SMOL, prompt=prompt, temperature=0.9, seed=5, max_tokens=8, n=3, logprobs=1)
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    stream = client.completions.create(
        model=SMOL, prompt=prompt, temperature=0.9, seed=5, max_tokens=8, n=3, logprobs=1, stream=True
    )
    texts = ["", "", ""]
    tokens: list[list[str]] = [[], [], []]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                tokens[choice.index] += choice.logprobs.tokens or []
    assert texts == [choice.text for choice in whole.choices]
    for choice in whole.choices:
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        assert "".join(choice.logprobs.tokens) == choice.text
        assert tokens[choice.index] == choice.logprobs.tokens
        assert choice.logprobs.text_offset is not None and choice.logprobs.text_offset[0] == len(prompt)


def test_choices_that_need_every_slot_queue_behind_others(client: openai.OpenAI) -> None:
    """Requests for 4 (all the slots), 3 and 1 choices at once: each waits for its slots, none is stuck."""
    jobs = [4, 3, 1, 2]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(
            pool.map(
                lambda n: client.chat.completions.create(model=SMOL, messages=SEA, temperature=0, max_tokens=6, n=n),
                jobs,
            )
        )
    texts = {text for reply in replies for text in choice_texts(reply)}
    assert [len(reply.choices) for reply in replies] == jobs
    assert len(texts) == 1


def test_more_choices_than_slots_are_refused_before_any_work(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": SMOL, "messages": SEA, "n": 5}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "n"
    assert "4" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=SMOL, prompt="x", n=5, stream=True)
    assert info.value.param == "n"
