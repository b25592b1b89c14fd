"""Quotas: per-key token buckets (requests and tokens per minute) and a cap on inference in flight.

A handler calls :meth:`RateLimiter.admit` before any work (routing, model load)
and hands the :class:`Admission` to its :class:`~locopilot.gateway.usage.Outcome`;
recording the outcome calls :meth:`Admission.finish`, which charges the tokens
the request used and frees its place under the cap. ``finish`` is idempotent.

Each key with limits has up to two buckets, each refilling continuously at its
limit per minute up to the limit:

- **requests** (``rpm``): an admitted request takes one; none left is 429
  (``type: requests``).
- **tokens** (``tpm``): a request is admitted while the bucket holds more than
  zero, and takes the tokens it used (prompt + completion) when it finishes,
  because nobody knows them before. The bucket may go into debt; the key then
  waits until it refills past zero (429, ``type: tokens``). Requests admitted at
  the same moment may together use more than the bucket held: the limit holds
  over time, not for each request.

A request refused by one bucket takes nothing from the other. Keys without a
limit of their own get ``LOCOPILOT_DEFAULT_RPM`` / ``LOCOPILOT_DEFAULT_TPM``
(0: none). The bootstrap admin key and open mode have no per-key limits.

The global cap (``LOCOPILOT_MAX_CONCURRENT_REQUESTS``, 0: none) counts every
inference request in flight, whoever sends it; one more is 503 at once
(:class:`~locopilot.errors.Overloaded`): the server is busy, which is not the
client's doing, as a 429 would say.

State lives in this process's memory. The server runs one worker, so one
limiter sees every request; a restart starts every bucket full. :meth:`admit`
checks and takes without awaiting anything, so requests racing on the event
loop cannot both take the last request from a bucket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from locopilot.errors import Overloaded, RateLimited, RequestRateLimited, TokenRateLimited
from locopilot.gateway.auth import BOOTSTRAP_ADMIN_ID, Principal

#: What a refusal tells a client to wait when the cap, not a bucket, refused it.
OVERLOADED_RETRY_AFTER = 1


@dataclass
class Bucket:
    """``level`` of ``limit`` units, refilled at ``limit`` per 60 seconds of ``clock`` time."""

    limit: int
    level: float
    updated: float

    @property
    def rate(self) -> float:
        return self.limit / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until(self, level: float) -> float:
        """How long until the bucket holds ``level`` (0 if it does)."""
        return max(0.0, (level - self.level) / self.rate)

    def remaining(self) -> int:
        return max(0, math.floor(self.level))


@dataclass
class KeyBuckets:
    requests: Bucket | None = None
    tokens: Bucket | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the buckets this key has."""
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining())
                headers[f"x-ratelimit-reset-{name}"] = duration(bucket.seconds_until(bucket.limit))
        return headers


class LimitStats(msgspec.Struct):
    """Counters since start, for ``/v1/engine/stats``."""

    in_flight: int
    max_concurrent_requests: int
    rejected_requests: int
    """429s for a key's requests per minute."""
    rejected_tokens: int
    """429s for a key's tokens per minute."""
    rejected_concurrency: int
    """503s for the cap on requests in flight."""


@dataclass
class Admission:
    """One admitted request: its place under the cap and the key's buckets to charge."""

    limiter: RateLimiter
    buckets: KeyBuckets | None
    finished: bool = field(default=False)

    def headers(self) -> dict[str, str]:
        """The key's ``x-ratelimit-*`` headers now; none for a key without limits."""
        if self.buckets is None:
            return {}
        self.limiter.refill(self.buckets)
        return self.buckets.headers()

    def finish(self, tokens: int) -> None:
        """Charge ``tokens`` (prompt + completion) and free the place; later calls do nothing."""
        if self.finished:
            return
        self.finished = True
        self.limiter.in_flight -= 1
        if self.buckets is not None and self.buckets.tokens is not None and tokens > 0:
            self.limiter.refill(self.buckets)
            self.buckets.tokens.level -= tokens


class RateLimiter:
    """The quotas of one server process. ``clock`` is monotonic seconds, injectable for tests."""

    def __init__(
        self,
        max_concurrent: int = 0,
        default_rpm: int = 0,
        default_tpm: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.clock = clock
        self.in_flight = 0
        self.rejected = {"requests": 0, "tokens": 0, "concurrency": 0}
        self._keys: dict[str, KeyBuckets] = {}

    def limits_of(self, principal: Principal) -> tuple[int | None, int | None]:
        """``(rpm, tpm)`` for ``principal``; None where it has no limit."""
        if principal.key_id is None or principal.key_id == BOOTSTRAP_ADMIN_ID:
            return None, None
        rpm = principal.rpm if principal.rpm is not None else self.default_rpm
        tpm = principal.tpm if principal.tpm is not None else self.default_tpm
        return rpm or None, tpm or None

    def admit(self, principal: Principal) -> Admission:
        """Admit one inference request for ``principal``, or refuse it; nothing awaits in between.

        Raises:
            RequestRateLimited: the key has no request left this minute.
            TokenRateLimited: the key's token bucket is empty or in debt.
            Overloaded: the cap on requests in flight is reached.
        """
        buckets = self._buckets_of(principal)
        if buckets is not None:
            self.refill(buckets)
            if buckets.requests is not None and buckets.requests.level < 1:
                self.rejected["requests"] += 1
                wait = buckets.requests.seconds_until(1)
                raise self._refusal(RequestRateLimited, "requests per minute (RPM)", buckets.requests, buckets, wait)
            if buckets.tokens is not None and buckets.tokens.level <= 0:
                self.rejected["tokens"] += 1
                # Admitted again once the level is above zero: a hair past the time it reaches zero.
                wait = buckets.tokens.seconds_until(0) + 0.001
                raise self._refusal(TokenRateLimited, "tokens per minute (TPM)", buckets.tokens, buckets, wait)
        if self.max_concurrent and self.in_flight >= self.max_concurrent:
            self.rejected["concurrency"] += 1
            raise Overloaded(
                f"The server is at its limit of {self.max_concurrent} requests in flight. Try again shortly.",
                retry_after=OVERLOADED_RETRY_AFTER,
            )
        if buckets is not None and buckets.requests is not None:
            buckets.requests.level -= 1
        self.in_flight += 1
        return Admission(self, buckets)

    def refill(self, buckets: KeyBuckets) -> None:
        now = self.clock()
        for bucket in (buckets.requests, buckets.tokens):
            if bucket is not None:
                bucket.refill(now)

    def stats(self) -> LimitStats:
        return LimitStats(
            in_flight=self.in_flight,
            max_concurrent_requests=self.max_concurrent,
            rejected_requests=self.rejected["requests"],
            rejected_tokens=self.rejected["tokens"],
            rejected_concurrency=self.rejected["concurrency"],
        )

    def _buckets_of(self, principal: Principal) -> KeyBuckets | None:
        rpm, tpm = self.limits_of(principal)
        if principal.key_id is None or (rpm is None and tpm is None):
            return None
        buckets = self._keys.setdefault(principal.key_id, KeyBuckets())
        buckets.requests = self._resized(buckets.requests, rpm)
        buckets.tokens = self._resized(buckets.tokens, tpm)
        return buckets

    def _resized(self, bucket: Bucket | None, limit: int | None) -> Bucket | None:
        """``bucket`` for ``limit``: a new one starts full; a changed limit keeps what was used."""
        if limit is None:
            return None
        if bucket is None:
            return Bucket(limit, float(limit), self.clock())
        if bucket.limit != limit:
            bucket.refill(self.clock())
            bucket.level = min(float(limit), bucket.level)
            bucket.limit = limit
        return bucket

    @staticmethod
    def _refusal(kind: type[RateLimited], what: str, bucket: Bucket, buckets: KeyBuckets, wait: float) -> RateLimited:
        retry_after = max(1, math.ceil(wait))
        message = (
            f"Rate limit reached for this API key on {what}: limit {bucket.limit}, "
            f"remaining {bucket.remaining()}. Please try again in {duration(wait)}."
        )
        headers = {**buckets.headers(), "retry-after-ms": str(max(1, math.ceil(wait * 1000)))}
        return kind(message, retry_after=retry_after, limit_headers=headers)


def duration(seconds: float) -> str:
    """A wait the way OpenAI's ``x-ratelimit-reset-*`` headers write it: ``250ms``, ``6s``, ``1m30s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
