"""A bounded pool for image decoding: at most ``workers`` decodes at once, ``max_queued`` waiting.

Decoding is the one step whose cost the client controls, so it gets its own fixed set of
threads (Pillow releases the GIL while decoding, so they run in parallel): peak decode memory is
``workers`` images' worth whatever the number of open connections. A request that finds the
queue full is refused at once with :class:`Overloaded` (429 / RESOURCE_EXHAUSTED) rather than
queued without bound, and one cancelled while it waits is dropped before it decodes anything.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from fewshot_common.cancellation import CancellationCheck, raise_if_cancelled
from fewshot_common.cores import usable_cores
from fewshot_common.errors import Overloaded, Unavailable

T = TypeVar("T")


class DecodePool:
    """Runs decode jobs on ``workers`` threads; refuses a job beyond ``workers + max_queued``."""

    def __init__(self, workers: int | None = None, max_queued: int = 16) -> None:
        workers = workers or usable_cores()  # one decode thread per core
        if workers <= 0 or max_queued < 0:
            raise ValueError(f"need workers > 0 and max_queued >= 0, got {workers}, {max_queued}")
        self.workers = workers
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fewshot-decode")
        self._slots = threading.BoundedSemaphore(workers + max_queued)
        self._closed = False

    def run(self, job: Callable[[], T], cancellation: CancellationCheck | None = None) -> T:
        """Run ``job`` on a pool thread and return its result (its exception is re-raised)."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        if not self._slots.acquire(blocking=False):
            raise Overloaded(
                f"the server is busy: {self.workers} image decodes running and {self.max_queued} "
                "waiting; retry shortly"
            )

        def guarded() -> T:
            try:
                # A request cancelled while it queued must not start decoding.
                raise_if_cancelled(cancellation, "decoding its images")
                return job()
            finally:
                self._slots.release()

        try:
            future = self._executor.submit(guarded)
        except RuntimeError:  # executor shut down between the check and the submit
            self._slots.release()
            raise Unavailable("the server is shutting down") from None
        return future.result()

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)
