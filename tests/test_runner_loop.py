"""The runner's loop reads its own input between decode steps (no reader thread): a Cancel that
comes mid-generation still stops it, jobs that come together start together, and the end of
input ends the runner, its work cancelled. Spoken to over its pipes, as the API process does."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from locopilot.children import Child, Sender
from locopilot.engine import protocol
from locopilot.engine.protocol import (
    Cancel,
    Count,
    Counted,
    Delta,
    Done,
    FromRunner,
    Generate,
    Load,
    Ready,
    SamplingParams,
    Started,
)

# SmolLM2's end-of-text and end-of-turn tokens banned: a generation ends only by cancellation or max_tokens.
ENDLESS = SamplingParams(temperature=0, logit_bias={0: -100.0, 2: -100.0})
PROMPT = "Write a very long story about a dragon and a knight."


@pytest.fixture
def runner(smollm2_path: Path) -> Iterator[Child[FromRunner]]:
    child = Child("_runner", protocol.from_runner)
    try:
        child.send(Load(model_path=str(smollm2_path), ctx_size=4096, threads=2, gpu_layers=0, parallel=2))
        assert isinstance(child.receive(timeout=120), Ready)
        yield child
    finally:
        child.close(grace=5)


def until(child: Child[FromRunner], done: object) -> list[FromRunner]:
    """The runner's messages up to and including the first for which ``done`` is true."""
    assert callable(done)
    seen: list[FromRunner] = []
    while True:
        message = child.receive(timeout=60)
        assert message is not None, f"the runner ended; it had sent {seen}"
        seen.append(message)
        if done(message):
            return seen


def generated(messages: list[FromRunner], job_id: int) -> int:
    return sum(m.tokens for m in messages if isinstance(m, Delta) and m.id == job_id)


def test_a_cancel_that_comes_mid_generation_stops_it(runner: Child[FromRunner]) -> None:
    runner.send(Generate(id=1, prompt=PROMPT, max_tokens=1500, sampling=ENDLESS))
    seen: list[FromRunner] = []
    while generated(seen, 1) < 5:
        seen += until(runner, lambda m: isinstance(m, Delta))
    runner.send(Cancel(id=1))
    rest = until(runner, lambda m: isinstance(m, Done))
    done = rest[-1]
    assert isinstance(done, Done) and done.id == 1 and done.finish_reason == "cancelled"
    # Read between steps: it stopped a step or two after the Cancel came (what else came after it
    # was already in the pipe), far short of 1500.
    assert generated(rest, 1) < 200, generated(rest, 1)
    # The slot is free for the next request.
    runner.send(Generate(id=2, prompt=PROMPT, max_tokens=3, sampling=ENDLESS))
    final = until(runner, lambda m: isinstance(m, Done))[-1]
    assert isinstance(final, Done) and final.id == 2
    assert (final.finish_reason, final.completion_tokens) == ("length", 3)


def test_jobs_that_come_together_start_together_and_the_end_of_input_cancels(runner: Child[FromRunner]) -> None:
    assert runner.process.stdin is not None
    jobs = [Generate(id=i, prompt=f"{PROMPT} ({i})", max_tokens=1500, sampling=ENDLESS) for i in (1, 2)]
    Sender(runner.process.stdin).send_all([*jobs, Count(id=3, job=jobs[0])])
    seen = until(runner, lambda m: isinstance(m, Delta))
    # Both were read before the first step: both started before either decoded a token.
    assert {m.id for m in seen if isinstance(m, Started)} == {1, 2}
    assert any(isinstance(m, Counted) and m.id == 3 for m in seen)
    # The end of input mid-generation: every job ends as cancelled, then the runner exits.
    runner.close_input()
    rest = list(runner)
    done = {m.id: m for m in rest if isinstance(m, Done)}
    assert set(done) == {1, 2}
    assert all(m.finish_reason == "cancelled" for m in done.values())
    assert generated(seen + rest, 1) < 200
    try:
        assert runner.process.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the runner did not exit after its input ended")
