"""The client half of build/smoke_test.sh: what a user's program does with the frozen server.

    smoke_client.py BASE_URL MODEL chat       a chat and a streamed chat with the official openai client
    smoke_client.py BASE_URL MODEL crash      SIGKILL the model's runner, then a chat must be served by a new one
    smoke_client.py BASE_URL MODEL cpu        print the CPU library llama.cpp chose (engine.cpu.variant)
    smoke_client.py BASE_URL MODEL gpu        the GPUs engine health names, a chat, and the layers its runner put on one

Runs in the development environment (.venv), which has ``openai`` and ``httpx``; the
server under test is the frozen binary. Exits non-zero with a message on the first
thing that is wrong.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx
import openai

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
# Generous: under qemu's emulation one token takes seconds.
TIMEOUT = float(os.environ.get("SMOKE_CLIENT_TIMEOUT", "300"))


def engine(base: str) -> dict[str, object]:
    answer = httpx.get(f"{base}/v1/engine/health", timeout=TIMEOUT)
    answer.raise_for_status()
    found: dict[str, object] = answer.json()["engine"]
    return found


def runner_pids(base: str) -> list[int]:
    """The live runners' process ids (a dead one stays listed, not alive, until replaced)."""
    runners = engine(base)["runners"]
    assert isinstance(runners, list)
    return [r["pid"] for r in runners if r["alive"]]


def chat(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0)
    assert reply.choices and reply.choices[0].message.content is not None, reply
    assert reply.usage is not None and reply.usage.completion_tokens > 0, reply
    print(f"chat: {reply.choices[0].message.content!r} ({reply.usage.completion_tokens} tokens)")

    pieces: list[str] = []
    finish: str | None = None
    with client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert finish in ("stop", "length"), f"the stream ended without a finish reason ({pieces})"
    streamed = "".join(pieces)
    # Greedy both times, so the same words.
    assert streamed == reply.choices[0].message.content, (streamed, reply.choices[0].message.content)
    print(f"stream: {len(pieces)} chunks, {streamed!r}, finish {finish}")


def crash(client: openai.OpenAI, base: str, model: str) -> None:
    before = runner_pids(base)
    assert len(before) == 1, f"expected one runner, found {before}"
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while before[0] in runner_pids(base):
        assert time.monotonic() < deadline, "the server still counts the killed runner alive"
        time.sleep(0.2)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens > 0, reply
    after = runner_pids(base)
    assert len(after) == 1 and after[0] != before[0], (before, after)
    print(f"runner {before[0]} killed; runner {after[0]} answered {reply.choices[0].message.content!r}")


def gpu(client: openai.OpenAI, base: str, model: str) -> None:
    gpus = engine(base)["gpus"]
    assert isinstance(gpus, list) and gpus, f"engine health names no GPU: {engine(base).get('gpu_note')}"
    for device in gpus:
        print(
            f"{device['name']} ({device['backend']}): {device['description']}, "
            f"{device['memory_free'] / 1024**3:.2f} GiB free of {device['memory_total'] / 1024**3:.2f} GiB"
        )
    chat(client, model)
    runners = engine(base)["runners"]
    assert isinstance(runners, list) and runners, "no runner after a chat"
    assert runners[0]["gpu_layers"] > 0, f"the runner put no layer on a GPU: {runners[0]['offload']}"
    print(f"runner: {runners[0]['offload']}")


def main() -> None:
    base, model, what = sys.argv[1:4]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    if what == "chat":
        chat(client, model)
    elif what == "crash":
        crash(client, base, model)
    elif what == "cpu":
        cpu = engine(base)["cpu"]
        assert isinstance(cpu, dict), f"the engine names no CPU library: {cpu}"
        print(cpu["variant"])
    elif what == "gpu":
        gpu(client, base, model)
    else:
        sys.exit(f"unknown step {what!r}")


if __name__ == "__main__":
    main()
