"""Logprobs on the embedded engine, in OpenAI's chat and legacy completions shapes, with the official client."""

from __future__ import annotations

import ctypes
import math

import httpx
import numpy as np
import openai
import pytest
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob

from locopilot.api.openai import TextOffsets
from locopilot.engine.batching import PendingLogprobs
from locopilot.engine.protocol import TokenLogprob
from locopilot.engine.sampling import token_logprob, token_text
from tests.conftest import SMOL, Server

CAPITAL = [{"role": "user", "content": "Which city is the capital of France?"}]
PROMPT = "The capital of France is"


def chat_logprobs(client: openai.OpenAI, **kwargs: object) -> tuple[str, list[ChatCompletionTokenLogprob], int]:
    """Content, logprobs and completion tokens of a whole (non-streamed) chat reply."""
    reply = client.chat.completions.create(model=SMOL, messages=CAPITAL, **kwargs)  # type: ignore[call-overload]
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert reply.usage is not None
    return choice.message.content or "", choice.logprobs.content, reply.usage.completion_tokens


def test_chat_logprobs_greedy(client: openai.OpenAI) -> None:
    content, tokens, completion_tokens = chat_logprobs(
        client, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5
    )
    assert "Paris" in content
    assert len(tokens) == completion_tokens
    assert "".join(t.token for t in tokens) == content
    for token in tokens:
        assert token.bytes == list(token.token.encode())
        assert token.logprob <= 0
        top = token.top_logprobs
        assert len(top) == 5
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert sum(math.exp(t.logprob) for t in top) <= 1 + 1e-6
        # Greedy: the chosen token is the likeliest, so it heads its own list with its own logprob.
        assert top[0].token == token.token
        assert top[0].logprob == pytest.approx(token.logprob)
    # The greedy reply's probability is the product of each step's best.
    joint = math.exp(sum(t.logprob for t in tokens))
    assert 0 < joint <= 1
    assert joint == pytest.approx(math.prod(math.exp(t.top_logprobs[0].logprob) for t in tokens))


def test_chat_logprobs_stream_match_the_whole_reply(client: openai.OpenAI) -> None:
    content, tokens, _ = chat_logprobs(client, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(
        model=SMOL, messages=CAPITAL, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2, stream=True
    )
    streamed: list[ChatCompletionTokenLogprob] = []
    text = ""
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert text == content
    assert [t.token for t in streamed] == [t.token for t in tokens]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in tokens], abs=1e-3)
    assert all(len(t.top_logprobs) == 2 for t in streamed)


def test_chat_logprobs_without_alternatives_and_without_asking(client: openai.OpenAI) -> None:
    _, tokens, _ = chat_logprobs(client, temperature=0, max_tokens=4, logprobs=True)
    assert tokens and all(t.top_logprobs == [] for t in tokens)
    plain = client.chat.completions.create(model=SMOL, messages=CAPITAL, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None
    raw = httpx.post(
        f"{client.base_url}chat/completions",
        json={"model": SMOL, "messages": CAPITAL, "max_tokens": 2, "stream": True},
        timeout=60,
    ).text
    assert '"logprobs":null' in raw


def test_logprobs_are_the_models_distribution_not_the_samplers(client: openai.OpenAI) -> None:
    """Temperature, top-k and bias change what is picked, never the reported distribution (as OpenAI
    and llama-server's n_probs report it)."""
    _, greedy, _ = chat_logprobs(client, temperature=0, max_tokens=1, logprobs=True, top_logprobs=5)
    _, sampled, _ = chat_logprobs(
        client, temperature=1.7, extra_body={"top_k": 2}, seed=3, max_tokens=1, logprobs=True, top_logprobs=5
    )
    assert [t.token for t in sampled[0].top_logprobs] == [t.token for t in greedy[0].top_logprobs]
    assert [t.logprob for t in sampled[0].top_logprobs] == pytest.approx(
        [t.logprob for t in greedy[0].top_logprobs], abs=1e-3
    )
    chosen = {t.token: t.logprob for t in greedy[0].top_logprobs}
    assert sampled[0].logprob == pytest.approx(chosen[sampled[0].token], abs=1e-3)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=SMOL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=3)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs and logprobs.text_offset
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    # Offsets count from the prompt's start, as OpenAI's do.
    assert logprobs.text_offset[0] == len(PROMPT)
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert (PROMPT + choice.text)[offset : offset + len(token)] == token
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert value <= 0
        assert 3 <= len(top) <= 4  # the 3 likeliest, and the chosen token always
        assert top[token] == pytest.approx(value)
        assert max(top.values()) == pytest.approx(value)  # greedy

    stream = client.completions.create(model=SMOL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=3, stream=True)
    tokens: list[str] = []
    offsets: list[int] = []
    for chunk in stream:
        for each in chunk.choices:
            if each.logprobs is not None:
                tokens.extend(each.logprobs.tokens or [])
                offsets.extend(each.logprobs.text_offset or [])
    assert tokens == logprobs.tokens
    assert offsets == logprobs.text_offset


def test_completion_logprobs_are_each_steps_given_the_text_before(client: openai.OpenAI) -> None:
    """Token k's logprob is the model's for that token after the prompt and tokens 1..k-1: asked again
    with the first token appended to the prompt, the second comes back with the same logprob."""
    first = client.completions.create(model=SMOL, prompt=PROMPT, temperature=0, max_tokens=2, logprobs=1)
    logprobs = first.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert logprobs.tokens[0] == " Paris"
    again = client.completions.create(
        model=SMOL, prompt=PROMPT + logprobs.tokens[0], temperature=0, max_tokens=1, logprobs=1
    )
    next_logprobs = again.choices[0].logprobs
    assert next_logprobs is not None and next_logprobs.token_logprobs is not None
    assert next_logprobs.tokens == logprobs.tokens[1:]
    assert next_logprobs.token_logprobs[0] == pytest.approx(logprobs.token_logprobs[1], abs=1e-3)
    assert next_logprobs.text_offset == [len(PROMPT) + len(" Paris")]


def test_completion_logprobs_leave_out_a_stop_strings_tokens(client: openai.OpenAI) -> None:
    stopped = client.completions.create(model=SMOL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=0, stop=["."])
    logprobs = stopped.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert stopped.choices[0].text == " Paris"
    assert logprobs.tokens == [" Paris"]  # not the "." that begins the stop string
    assert logprobs.top_logprobs == [{" Paris": pytest.approx(logprobs.token_logprobs[0])}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat/completions", {"messages": CAPITAL, "logprobs": 3}, "logprobs"),
        ("chat/completions", {"messages": CAPITAL, "top_logprobs": 3}, "top_logprobs"),
        ("chat/completions", {"messages": CAPITAL, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs"),
        ("completions", {"prompt": PROMPT, "logprobs": True}, "logprobs"),
        ("completions", {"prompt": PROMPT, "logprobs": 2, "echo": True}, "logprobs"),
    ],
)
def test_bad_logprobs_are_400_with_param(server: Server, path: str, body: dict[str, object], param: str) -> None:
    response = httpx.post(f"{server.url}/v1/{path}", json={"model": SMOL, "max_tokens": 2, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# The pieces, without a model


def test_token_logprob_is_a_log_softmax_of_the_raw_logits() -> None:
    logits = np.array([1.0, 3.0, -2.0, 3.5, 0.0], dtype=np.float32)
    row = (ctypes.c_float * len(logits))(*logits)
    pieces = {0: b"a", 1: b"b", 2: b"c", 3: b"\xc3", 4: b"e"}
    found = token_logprob(row, np.empty(len(logits), np.float32), 1, 2, pieces.__getitem__)
    expected = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    assert found.logprob == pytest.approx(expected[1], abs=1e-6)
    assert found.token == "b"
    assert found.bytes == [98]
    assert [t.logprob for t in found.top] == pytest.approx([expected[3], expected[1]], abs=1e-6)
    # A token that ends inside a character: its text is the whole part (none), its bytes all of it.
    assert (found.top[0].token, found.top[0].bytes) == ("", [0xC3])
    assert token_text(b"ab\xc3") == "ab"
    alone = token_logprob(row, np.empty(len(logits), np.float32), 1, 0, pieces.__getitem__)
    assert alone.top == ()


def test_pending_logprobs_follow_the_text_that_is_sent() -> None:
    def lp(token: str) -> TokenLogprob:
        return TokenLogprob(token=token, logprob=-1.0)

    pending = PendingLogprobs(0)
    pending.add(lp("Hel"), "Hel")
    pending.add(lp("lo"), "lo")
    assert [t.token for t in pending.take("He")] == ["Hel"]  # the rest of "Hel" is held back
    pending.add(lp("\xe2"), "")  # the first byte of a character: no text yet
    pending.add(lp("\x82\xac"), "€")
    assert [t.token for t in pending.take("llo")] == ["lo"]
    assert [t.token for t in pending.take("€")] == ["\xe2", "\x82\xac"]
    pending.add(lp(" STOP"), " STOP")
    assert pending.take("") == ()
    assert [t.token for t in pending.rest()] == [" STOP"]


def test_text_offsets_count_characters_as_the_text_has_them() -> None:
    offsets = TextOffsets(5)
    tokens = [
        TokenLogprob(token="a", logprob=0, bytes=[97]),
        TokenLogprob(token="", logprob=0, bytes=[0xE2]),
        TokenLogprob(token="", logprob=0, bytes=[0x82, 0xAC]),
        TokenLogprob(token="b", logprob=0, bytes=[98]),
    ]
    assert [offsets.next(t) for t in tokens] == [5, 6, 6, 7]
