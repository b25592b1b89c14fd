"""Balancing a pool of replicas: which one of several providers that serve the same model gets a request.

A *pool* is a run of candidates with the same priority and locality (see
:meth:`locopilot.gateway.router.Router.balance`). Each replica has a
:class:`Load`: its ``weight``, its cap on requests at once and the requests it
has in flight (counted by a :class:`Lease` from the attempt to the end of the
reply).

Without affinity the least busy replica goes first: fewest requests in flight
per unit of weight, ties broken at random in proportion to weight (so idle
replicas share sequential traffic by weight). A pool larger than
:data:`TWO_CHOICES_ABOVE` samples two replicas by weight and takes the less busy
(the power of two choices), which spreads as well without scanning them all.

With an affinity key (a session id, or a fingerprint of a conversation's
leading messages, :func:`affinity_key`), the replicas are ranked for that key
by weighted rendezvous hashing, a consistent hash: a key keeps its replica while
the pool does not change, and removing a replica moves only its keys. The first
in that ranking that is not *overloaded* is chosen (a bounded-load consistent
hash): at its cap, or with more in flight than ``load_factor`` times its
weighted share of the pool's requests in flight, counting this one. The one the
key ranks first is the *affinity* replica; choosing another is a *spill*.

Replicas with weight 0 or at their cap go last, in that order: they are tried
only when nothing else in the pool can be, and a capped one is then skipped by
failover without being sent anything.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from locopilot.providers.base import GenerationRequest

TWO_CHOICES_ABOVE = 4
PREFIX_CHARS = 8192
"""At most this many characters of leading messages are hashed for a fingerprint."""
PROMPT_CHARS = 512
"""A completion prompt's fingerprint is of its first characters, which later turns repeat."""
PROMPT_TOKENS = 128

AffinityKind = Literal["session", "prefix"]


@dataclass
class Load:
    """One replica's share and what it is doing now."""

    weight: float = 1.0
    cap: int = 0
    """Requests at once; 0 is no cap."""
    in_flight: int = 0

    def full(self) -> bool:
        return self.cap > 0 and self.in_flight >= self.cap

    def busy(self) -> float:
        """Requests in flight per unit of weight."""
        return self.in_flight / self.weight if self.weight > 0 else math.inf


class Lease:
    """One request in flight on a replica, from :meth:`__init__` to :meth:`release` (idempotent)."""

    __slots__ = ("load", "released")

    def __init__(self, load: Load) -> None:
        self.load = load
        self.released = False
        load.in_flight += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.load.in_flight -= 1


@dataclass(frozen=True)
class Choice:
    """A pool in the order to try it, and what affinity did (``preferred``: the replica the key ranks first)."""

    order: list[int]
    preferred: int | None = None


def choose(
    loads: Sequence[Load],
    key: bytes | None,
    names: Sequence[str],
    *,
    load_factor: float,
    rng: random.Random,
) -> Choice:
    """The order to try a pool's replicas in (indexes into ``loads``): the chosen first, then the
    rest, least busy first, with weight-0 and capped replicas last."""
    members = list(range(len(loads)))
    able = [i for i in members if loads[i].weight > 0 and not loads[i].full()]
    if not able:
        return Choice(_rest(loads, members, rng))
    if key is not None:
        # Ranked among all that take traffic, full ones too: a full first choice makes this a spill.
        weighted = [i for i in members if loads[i].weight > 0]
        ranked = [
            weighted[i] for i in rendezvous(key, [names[i] for i in weighted], [loads[i].weight for i in weighted])
        ]
        total = sum(loads[i].in_flight for i in members) + 1
        weights = sum(loads[i].weight for i in weighted)
        for index in ranked:
            bound = math.ceil(load_factor * total * loads[index].weight / weights)
            if not loads[index].full() and loads[index].in_flight + 1 <= bound:
                return Choice([index, *_rest(loads, [i for i in members if i != index], rng)], ranked[0])
        chosen = _least_busy(loads, able, rng)
        return Choice([chosen, *_rest(loads, [i for i in members if i != chosen], rng)], ranked[0])
    chosen = _least_busy(loads, able, rng)
    return Choice([chosen, *_rest(loads, [i for i in members if i != chosen], rng)])


def _least_busy(loads: Sequence[Load], able: list[int], rng: random.Random) -> int:
    if len(able) > TWO_CHOICES_ABOVE:
        first = rng.choices(able, weights=[loads[i].weight for i in able])[0]
        others = [i for i in able if i != first]
        second = rng.choices(others, weights=[loads[i].weight for i in others])[0]
        able = [first, second]
    least = min(loads[i].busy() for i in able)
    tied = [i for i in able if loads[i].busy() == least]
    return tied[0] if len(tied) == 1 else rng.choices(tied, weights=[loads[i].weight for i in tied])[0]


def _rest(loads: Sequence[Load], members: list[int], rng: random.Random) -> list[int]:
    """Failover order for the others: usable least busy first, then weight 0, then capped; ties at random."""
    tiebreak = {i: rng.random() for i in members}

    def rank(i: int) -> tuple[bool, bool, float, float]:
        return loads[i].full(), loads[i].weight == 0, loads[i].busy(), tiebreak[i]

    return sorted(members, key=rank)


def rendezvous(key: bytes, names: Sequence[str], weights: Sequence[float]) -> list[int]:
    """Indexes of ``names`` ranked for ``key`` by weighted rendezvous (highest random weight) hashing."""

    def score(index: int) -> float:
        digest = hashlib.blake2b(key + b"\0" + names[index].encode(), digest_size=8).digest()
        uniform = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
        return -weights[index] / math.log(uniform)

    return sorted(range(len(names)), key=score, reverse=True)


def affinity_key(
    generation: GenerationRequest, session: str | None, mode: Literal["prefix", "session", "off"]
) -> tuple[AffinityKind, bytes] | None:
    """What keeps a conversation on one replica: an explicit session id (``X-Session-Id`` or the
    request's ``user``), else with ``prefix`` a fingerprint of how the prompt begins.

    The fingerprint covers the messages up to and including the first user message (a system prompt
    and the opening question, which every later turn of the conversation repeats), at most
    :data:`PREFIX_CHARS` characters of them, or the first :data:`PROMPT_CHARS` characters of a
    completion prompt. It is a short hash: no prompt text is kept or logged.
    """
    if mode == "off":
        return None
    if session:
        return "session", b"s\0" + session.encode()
    if mode == "session":
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(generation.model.encode() + b"\0")
    if generation.messages:
        budget = PREFIX_CHARS
        for message in generation.messages:
            text = message.content[:budget]
            budget -= len(text)
            digest.update(f"{message.role}\0{len(message.images)}\0".encode())
            digest.update(text.encode(errors="replace") + b"\0")
            if message.role == "user" or budget <= 0:
                break
    elif generation.prompt_tokens:
        digest.update(b"t" + b",".join(str(t).encode() for t in generation.prompt_tokens[:PROMPT_TOKENS]))
    elif generation.prompt:
        digest.update(b"p" + generation.prompt[:PROMPT_CHARS].encode(errors="replace"))
    else:
        return None
    return "prefix", b"p\0" + digest.digest()
