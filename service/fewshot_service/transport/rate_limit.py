"""Per-key rate limits: a token bucket per API key and kind (requests, images), in this process.

The limits are **per replica**: each server counts its own callers, so N replicas behind a load
balancer let a key through at up to N times its configured rate. Kept in-process on purpose: a
limit costs no Redis round trip per request (Redis is the registry's, and may be a cluster), and a
Redis outage cannot turn into refused or unlimited traffic. Set the rates as (wanted total) /
(replicas) when that matters; docs/security.md says so.

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; a request takes one
``requests`` token, and each of its images one ``images`` token. When the bucket lacks them the
caller gets :class:`RateLimited` with the whole seconds until it would have them (Retry-After).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter

from fewshot_common import errors

Kind = Literal["requests", "images"]

RATE_LIMITED = Counter(
    "fewshot_rate_limited_total",
    "Requests refused by a per-key rate limit, by API key name (never the key) and kind.",
    ["key_name", "kind"],  # kind: requests, images
)


@dataclass(frozen=True)
class Limit:
    """``rate`` tokens per second, at most ``burst`` saved up (a fresh bucket starts full)."""

    rate: float
    burst: float


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits; None: unlimited."""

    requests: Limit | None = None
    images: Limit | None = None


UNLIMITED = KeyLimits()


class _Bucket:
    __slots__ = ("limit", "tokens", "stamp")

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self.tokens = limit.burst
        self.stamp = now

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens; 0.0 when taken, else the seconds until they would be there."""
        self.tokens = min(self.limit.burst, self.tokens + (now - self.stamp) * self.limit.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.limit.rate


class RateLimiter:
    """The buckets of one server, by (key name, kind). A key whose limit changed (key file
    reload) starts a fresh, full bucket at the new limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, Kind], _Bucket] = {}

    def take(self, key_name: str, kind: Kind, limit: Limit | None, n: int = 1) -> None:
        """RateLimited unless ``key_name``'s ``kind`` bucket has ``n`` tokens (then they are
        taken); TooLarge when ``n`` exceeds the burst, which no wait would cure."""
        if limit is None or n <= 0:
            return
        if n > limit.burst:
            RATE_LIMITED.labels(key_name, kind).inc()
            raise errors.TooLarge(
                f"{n} {kind} in one request exceed the burst of API key {key_name!r} "
                f"({limit.burst:g} {kind}); send fewer per request"
            )
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get((key_name, kind))
            if bucket is None or bucket.limit != limit:
                bucket = self._buckets[(key_name, kind)] = _Bucket(limit, now)
            wait = bucket.take(n, now)
        if wait > 0:
            RATE_LIMITED.labels(key_name, kind).inc()
            retry_after_s = max(1, math.ceil(wait))
            raise errors.RateLimited(
                f"API key {key_name!r} is over its limit of {limit.rate:g} {kind}/s; "
                f"retry in {retry_after_s} s",
                retry_after_s=retry_after_s,
            )
