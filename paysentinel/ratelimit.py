"""Token buckets for abuse limits: a rate (tokens per second) and a burst (the bucket's size).

Pure and synchronous; the clock is passed in, so the rules are tested without waiting.
A request passes only when every bucket it counts against has a token, and then takes
one from each: a request refused by one limit uses up nothing of the others.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """``per_second`` tokens refill a bucket of ``burst``; a rate of 0 means no limit."""

    per_second: float
    burst: int

    @property
    def off(self) -> bool:
        return self.per_second <= 0


class TokenBucket:
    def __init__(self, limit: Limit, now: float):
        self.limit = limit
        self.tokens = float(limit.burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(float(self.limit.burst), self.tokens + (now - self.updated) * self.limit.per_second)
            self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._refill(now)
        if self.tokens >= 1:
            return 0.0
        if self.limit.burst < 1:
            return math.inf
        return (1 - self.tokens) / self.limit.per_second

    def take(self) -> None:
        self.tokens -= 1

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.limit.burst


class RateLimiter:
    """Buckets by key, one limit for all of them; at most ``max_keys`` are kept (the least
    recently used go first: a bucket dropped is as good as full)."""

    def __init__(self, limit: Limit, max_keys: int = 100_000):
        self.limit = limit
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.limit, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: which limit (its name), and when to try again."""

    name: str
    limit: Limit
    retry_after: float

    @property
    def retry_after_header(self) -> str:
        """The Retry-After value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


def admit(checks: Sequence[tuple[str, RateLimiter, str]], now: float) -> Refusal | None:
    """``checks`` are (name, limiter, key). None when the request may go (a token taken
    from each bucket), else the refusal with the longest wait."""
    buckets, refusals = [], []
    for name, limiter, key in checks:
        if limiter.limit.off:
            continue
        bucket = limiter.bucket(key, now)
        wait = bucket.wait(now)
        if wait > 0:
            refusals.append(Refusal(name, limiter.limit, wait))
        buckets.append(bucket)
    if refusals:
        return max(refusals, key=lambda r: r.retry_after)
    for bucket in buckets:
        bucket.take()
    return None
