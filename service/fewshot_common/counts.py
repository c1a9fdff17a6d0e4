"""Named counters that request threads bump at once, read by tests and benchmarks."""

from __future__ import annotations

import threading


class LockedCounts:
    """A fixed set of named counters; ``add`` and ``counts`` take a lock, since request threads
    count concurrently and ``dict[k] += 1`` is not atomic."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
