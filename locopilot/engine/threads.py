"""How many threads a step of one token gets: measured on the machine, not assumed.

A one-token step (one request generating) is short (SmolLM2 on 2 cores: about 5 ms),
and llama.cpp's threads wait on each other at every operation, so whatever else wants
a core at that moment (the API process's per-token work, another program) stalls all of
them. Whether one thread fewer than the cores is faster depends on the machine: on one
2-core Intel Xeon it was (0.92x -> 0.98x of llama-server), on a 2-core AMD EPYC it cost
30-40% of single-stream speed. So the runner times both while it serves: it alternates
the candidates for a few one-token steps, keeps the faster, and times them again after
a while, since the machine's load changes. Steps of several tokens (several requests, a
prompt) always use every thread (``threads_batch``); they are long enough not to suffer.

The candidates take turns in blocks of a few steps, and the first step after a switch is
not timed: ggml's OpenMP threads spin for a while after a step of several threads, so a
one-thread step right after one shares its core with a spinning thread that a run of
one-thread steps does not have.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

PROBE_STEPS = 8
"""One-token steps timed for each candidate in one round of measuring, at most."""
CLEAR = 1.25
"""A round ends after one block of each candidate when one's median is this many times the other's."""
HOLD_STEPS = 2048
"""One-token steps served with the chosen count before measuring again."""
BLOCK_STEPS = 4
"""One-token steps in a row with one candidate while measuring (the first is not timed)."""


class DecodeThreads:
    """Chooses llama.cpp's ``n_threads`` (one-token steps) among ``candidates``.

    The caller reports each step with :meth:`step` before it runs; a step's time is the
    time until the next step begins (decode, sampling and sending: the cycle a stream
    sees), counted only when both are one-token steps. ``apply`` sets the count on the
    context. A single candidate is fixed and never measured.
    """

    def __init__(self, candidates: tuple[int, ...], apply: Callable[[int], None], fixed_reason: str = "") -> None:
        self.candidates = candidates
        self.apply = apply
        self.threads = candidates[0]
        self.reason = fixed_reason if len(candidates) == 1 else "not measured yet (timed on the first one-token steps)"
        self._samples: dict[int, list[float]] | None = None  # step times by candidate while measuring
        self._block = 0  # steps left in the current block while measuring
        self._hold = 0  # one-token steps left before measuring again
        self._last: tuple[float, int, bool] | None = None  # the previous one-token step: start, threads, timed
        self._applied = self.threads  # what the context has now
        if len(candidates) > 1:
            self._samples = {c: [] for c in candidates}

    def step(self, tokens: int, now: float) -> bool:
        """Report a step of ``tokens`` tokens about to run at ``now`` (seconds); sets the
        threads it runs with. True when the chosen count (or its reason) changed."""
        if len(self.candidates) == 1:
            return False
        last, self._last = self._last, None
        if tokens != 1:
            return False
        changed = False
        samples = self._samples
        if samples is not None and last is not None and last[2]:
            samples[last[1]].append(now - last[0])
            if all(len(s) >= PROBE_STEPS for s in samples.values()) or self._clear(samples):
                changed = self._choose(samples)
        if (measuring := self._samples) is not None:
            if self._block <= 0:
                # The candidate timed least so far: they alternate, so a stream's context
                # growing (its steps slowing) weighs on each alike.
                threads = min(self.candidates, key=lambda c: len(measuring[c]))
                self._block = BLOCK_STEPS
            else:
                threads = self._applied
            self._block -= 1
        else:
            threads = self.threads
            self._hold -= 1
            if self._hold <= 0:
                self._samples = {c: [] for c in self.candidates}
                self._block = 0
        timed = threads == self._applied and last is not None
        if threads != self._applied:
            self.apply(threads)
            self._applied = threads
        self._last = (now, threads, timed)
        return changed

    @staticmethod
    def _clear(samples: dict[int, list[float]]) -> bool:
        """Whether a whole block of each shows one candidate far ahead: measuring on costs
        more steps at the slower count than it could tell."""
        if any(len(s) < BLOCK_STEPS - 1 for s in samples.values()):
            return False
        medians = sorted(statistics.median(s) for s in samples.values())
        return medians[-1] >= CLEAR * medians[0]

    def _choose(self, samples: dict[int, list[float]]) -> bool:
        medians = {c: statistics.median(s) for c, s in samples.items()}
        best = min(self.candidates, key=lambda c: medians[c])
        timed = ", ".join(f"{c} threads {medians[c] * 1000:.2f} ms/token" for c in self.candidates)
        before = (self.threads, self.reason)
        self.threads = best
        steps = min(len(s) for s in samples.values())
        self.reason = f"measured: {timed} (medians of {steps} one-token steps each)"
        self._samples = None
        self._hold = HOLD_STEPS
        return (self.threads, self.reason) != before
