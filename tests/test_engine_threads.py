"""The runner's choice of threads for one-token steps (engine/threads.py), on a made-up clock."""

from __future__ import annotations

from locopilot.engine.threads import BLOCK_STEPS, HOLD_STEPS, PROBE_STEPS, DecodeThreads

MEASURED = "measured: 2 threads {:.2f} ms/token, 1 threads {:.2f} ms/token (medians of %d one-token steps each)"


class Machine:
    """One-token steps whose time depends on the thread count, and a step right after a
    switch slower by ``switch`` (threads left spinning); records what was applied."""

    def __init__(self, seconds: dict[int, float], switch: float = 0.0) -> None:
        self.seconds = seconds
        self.switch = switch
        self.now = 0.0
        self.applied: list[int] = []
        self.tuner = DecodeThreads((2, 1), self.applied.append)
        self.changes = 0
        self.steps = 0

    def run(self, steps: int, tokens: int = 1) -> None:
        for _ in range(steps):
            before = len(self.applied)
            if self.tuner.step(tokens, self.now):
                self.changes += 1
            self.steps += 1
            self.now += self.seconds[self.tuner._applied] + (self.switch if len(self.applied) > before else 0.0)

    def until_changed(self, limit: int = 200) -> int:
        """Steps run until the choice (or its reason) changed."""
        start, changes = self.steps, self.changes
        while self.changes == changes:
            assert self.steps - start < limit, "never measured"
            self.run(1)
        return self.steps - start


def test_it_keeps_the_faster_count_and_says_why() -> None:
    machine = Machine({2: 0.010, 1: 0.006})
    assert machine.tuner.threads == 2 and machine.tuner.reason.startswith("not measured")
    # So far apart that one block of each tells.
    assert machine.until_changed() < 3 * BLOCK_STEPS
    assert machine.tuner.threads == 1
    assert machine.tuner.reason == MEASURED.format(10, 6) % (BLOCK_STEPS - 1)
    machine.run(50)
    assert machine.applied[-1] == 1 and machine.tuner.threads == 1


def test_close_counts_are_timed_longer_and_the_step_after_a_switch_is_not() -> None:
    # A switch costs 20 ms once; the medians leave it out.
    machine = Machine({2: 0.008, 1: 0.0075}, switch=0.020)
    assert machine.until_changed() > 2 * PROBE_STEPS
    assert machine.tuner.threads == 1
    assert machine.tuner.reason == MEASURED.format(8, 7.5) % PROBE_STEPS


def test_it_measures_again_and_follows_a_change_of_load() -> None:
    machine = Machine({2: 0.005, 1: 0.008})
    machine.until_changed()
    assert machine.tuner.threads == 2
    machine.seconds = {2: 0.020, 1: 0.009}  # something else now takes a core
    assert machine.until_changed(limit=HOLD_STEPS + 200) > HOLD_STEPS
    assert machine.tuner.threads == 1


def test_steps_of_several_tokens_are_not_timed() -> None:
    machine = Machine({2: 0.010, 1: 0.006})
    machine.run(200, tokens=8)
    assert machine.applied == [] and machine.tuner.reason.startswith("not measured")
    # A one-token step that follows a larger one is not timed against it either.
    for _ in range(5 * PROBE_STEPS):
        machine.run(1)
        machine.run(1, tokens=8)
    assert machine.tuner.reason.startswith("not measured")


def test_a_single_candidate_is_fixed() -> None:
    applied: list[int] = []
    tuner = DecodeThreads((3,), applied.append, "set (LOCOPILOT_THREADS or the model's settings)")
    assert not any(tuner.step(1, t / 100) for t in range(100))
    assert (tuner.threads, applied) == (3, [])
    assert tuner.reason == "set (LOCOPILOT_THREADS or the model's settings)"
