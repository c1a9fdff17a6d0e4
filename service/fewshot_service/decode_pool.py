"""A bound on image decoding: at most ``workers`` decodes at once, ``max_queued`` waiting.

Decoding is the one step whose cost the client controls, so it has its own fixed budget: peak
decode memory is ``workers`` images' worth whatever the number of open connections. A request that
finds the queue full is refused at once with :class:`Overloaded` (429 / RESOURCE_EXHAUSTED) rather
than queued without bound, and one cancelled while it waits is dropped before it decodes anything.

The decode runs on the calling request's own thread once it has a slot (Pillow releases the GIL
while decoding, so slots run in parallel): handing it to a pool thread and back cost a thread
switch each way per request.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from fewshot_common.cancellation import CancellationCheck, raise_if_cancelled
from fewshot_common.cores import usable_cores
from fewshot_common.errors import Overloaded, Unavailable

T = TypeVar("T")


class DecodePool:
    """Runs decode jobs ``workers`` at a time; refuses a job beyond ``workers + max_queued``."""

    def __init__(self, workers: int | None = None, max_queued: int = 16) -> None:
        workers = workers or usable_cores()  # one decode at a time per core
        if workers <= 0 or max_queued < 0:
            raise ValueError(f"need workers > 0 and max_queued >= 0, got {workers}, {max_queued}")
        self.workers = workers
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._admitted = 0  # decoding or waiting for a slot
        self._decoding = 0
        self._closed = False

    def run(self, job: Callable[[], T], cancellation: CancellationCheck | None = None) -> T:
        """Run ``job`` on this thread once a slot is free and return its result."""
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._admitted >= self.workers + self.max_queued:
                raise Overloaded(
                    f"the server is busy: {self.workers} image decodes running and "
                    f"{self.max_queued} waiting; retry shortly"
                )
            self._admitted += 1
            while self._decoding >= self.workers:
                self._cond.wait()
            self._decoding += 1
        try:
            # A request cancelled while it queued must not start decoding.
            raise_if_cancelled(cancellation, "decoding its images")
            return job()
        finally:
            with self._cond:
                self._decoding -= 1
                self._admitted -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new jobs and wait for the admitted ones to finish."""
        with self._cond:
            self._closed = True
            while self._admitted:
                self._cond.wait()
