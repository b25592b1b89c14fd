"""The runner's choice of threads for one-token steps (engine/threads.py), on a made-up clock."""

from __future__ import annotations

from locopilot.engine.threads import HOLD_STEPS, PROBE_STEPS, DecodeThreads


class Machine:
    """One-token steps whose time depends on the thread count; records what was applied."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.applied: list[int] = []
        self.tuner = DecodeThreads((2, 1), self.applied.append)
        self.changes = 0

    def run(self, steps: int, tokens: int = 1) -> None:
        for _ in range(steps):
            if self.tuner.step(tokens, self.now):
                self.changes += 1
            self.now += self.seconds[self.tuner._applied]


def test_it_keeps_the_faster_count_and_says_why() -> None:
    machine = Machine({2: 0.010, 1: 0.006})
    assert machine.tuner.threads == 2 and machine.tuner.reason.startswith("not measured")
    machine.run(2 * PROBE_STEPS + 1)
    assert machine.tuner.threads == 1
    assert machine.tuner.reason == (
        f"measured: 2 threads 10.00 ms/token, 1 threads 6.00 ms/token (medians of {PROBE_STEPS} one-token steps each)"
    )
    assert machine.changes == 1
    machine.run(50)
    assert machine.applied[-1] == 1 and machine.tuner.threads == 1


def test_it_measures_again_and_follows_a_change_of_load() -> None:
    machine = Machine({2: 0.005, 1: 0.008})
    machine.run(2 * PROBE_STEPS + 1)
    assert machine.tuner.threads == 2
    machine.seconds = {2: 0.020, 1: 0.009}  # something else now takes a core
    machine.run(HOLD_STEPS + 2 * PROBE_STEPS + 2)
    assert machine.tuner.threads == 1
    assert machine.changes == 2


def test_steps_of_several_tokens_are_not_timed() -> None:
    machine = Machine({2: 0.010, 1: 0.006})
    machine.run(200, tokens=8)
    assert machine.applied == [] and machine.tuner.reason.startswith("not measured")
    # A one-token step that follows a larger one is not timed against it either.
    for _ in range(PROBE_STEPS):
        machine.run(1)
        machine.run(1, tokens=8)
    assert machine.tuner.reason.startswith("not measured")


def test_a_single_candidate_is_fixed() -> None:
    applied: list[int] = []
    tuner = DecodeThreads((3,), applied.append, "set (LOCOPILOT_THREADS or the model's settings)")
    assert not any(tuner.step(1, t / 100) for t in range(100))
    assert (tuner.threads, applied) == (3, [])
    assert tuner.reason == "set (LOCOPILOT_THREADS or the model's settings)"
