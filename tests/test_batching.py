"""Continuous batching in the runner: several requests decode together, each as if alone."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import SMOL, Server, start_server
from tests.test_engine_lifecycle import ENDLESS, runners, wait_until

SLOTS = 4
QUESTIONS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "List three fruits.",
    "Explain what a computer is in one sentence.",
]
SYSTEM = (
    "You are a helpful assistant for a bakery. You answer questions about bread, cakes and opening hours. "
    "The bakery opens at seven in the morning and closes at six in the evening, every day but Sunday."
)


@pytest.fixture(scope="module")
def batching(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path_factory, {SMOL: smollm2_path}, {"LOCOPILOT_PARALLEL": str(SLOTS)})
    yield running
    running.stop()


def runner(server: Server) -> dict[str, object]:
    (found,) = runners(server)
    return found


def streamed(client: openai.OpenAI, question: str, seed: int | None = None) -> str:
    """The reply to ``question`` read as a stream (temperature 0 unless a seed asks for sampling)."""
    stream = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": question}],
        max_tokens=40,
        temperature=0 if seed is None else 0.9,
        seed=seed,
        stream=True,
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_the_runner_reports_its_slots(batching: Server) -> None:
    batching.client().chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert runner(batching)["slots"] == SLOTS


def test_concurrent_streams_each_get_their_solo_answer(batching: Server) -> None:
    """Different prompts (greedy, and sampled with a seed) side by side: nothing leaks between sequences."""
    client = batching.client()
    jobs = [(q, None) for q in QUESTIONS] + [(QUESTIONS[0], 7), (QUESTIONS[1], 11)]
    alone = [streamed(client, q, seed) for q, seed in jobs]
    assert len(set(alone)) == len(alone), alone  # distinct answers, so a mix-up would show
    # More requests than slots: the last ones queue and join as slots free up.
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: streamed(client, *job), jobs))
    assert together == alone


def test_a_short_request_finishes_while_a_long_one_runs(batching: Server) -> None:
    body = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "logit_bias": ENDLESS,
    }
    with httpx.stream("POST", f"{batching.url}/v1/chat/completions", json=body, timeout=60) as long_one:
        assert long_one.status_code == 200
        lines = long_one.iter_lines()
        assert next(lines).startswith("data: ")
        reply = batching.client().chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
        assert runner(batching)["in_flight"] == 1  # the long one is still running
    wait_until(lambda: runner(batching)["in_flight"] == 0, "the long request is cancelled")


def test_cancelled_sequences_free_their_slots(batching: Server) -> None:
    body = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "Write a very long story about a knight."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
        "logit_bias": ENDLESS,
    }
    before = runner(batching)["tokens_generated"]
    assert isinstance(before, int)
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{batching.url}/v1/chat/completions", json=body) for _ in range(SLOTS)]
        responses = [s.__enter__() for s in streams]
        assert all(response.status_code == 200 for response in responses)
        # Keep the iterators: dropping one closes its response, which cancels the request.
        lines = [response.iter_lines() for response in responses]
        assert all(next(line).startswith("data: ") for line in lines)
        assert runner(batching)["in_flight"] == SLOTS
        for stream in streams:
            stream.__exit__(None, None, None)
    wait_until(lambda: runner(batching)["in_flight"] == 0, "every slot is free again")
    # Every slot was taken; a new request is only served if the runner let go of them.
    reply = batching.client().chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, timeout=60
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3
    after = runner(batching)["tokens_generated"]
    assert isinstance(after, int)
    assert after - before < SLOTS * 300, (before, after)  # far short of 4 x 1500


def test_a_shared_prefix_is_not_computed_twice(batching: Server) -> None:
    client = batching.client()
    before = runner(batching)["cached_tokens"]
    assert isinstance(before, int)
    first: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "When do you open?"},
    ]
    reply = client.chat.completions.create(model=SMOL, messages=first, max_tokens=8, temperature=0)
    assert reply.usage is not None
    prompt_tokens = reply.usage.prompt_tokens
    second: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Do you sell cakes?"},
    ]
    client.chat.completions.create(model=SMOL, messages=second, max_tokens=8, temperature=0)
    reused = runner(batching)["cached_tokens"]
    assert isinstance(reused, int)
    # The system prompt (most of the first prompt) came from the cache.
    assert reused - before >= prompt_tokens // 2, (before, reused, prompt_tokens)


def test_a_reused_prefix_gives_the_same_answer(batching: Server) -> None:
    client = batching.client()
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is bread made of?"},
    ]
    answers = [
        client.chat.completions.create(model=SMOL, messages=messages, max_tokens=30, temperature=0)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert answers[0] == answers[1]
