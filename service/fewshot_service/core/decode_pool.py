"""A bound on image decoding: at most ``workers`` decodes at once, ``max_queued`` waiting.

Decoding is the one step whose cost the client controls, so it has its own fixed budget. Each
slot owns a decode worker process (decode_isolation.py) with hard memory and CPU limits, so peak
decode memory is ``workers`` workers' worth whatever the number of open connections or the tricks
in the files. A request that finds the queue full is refused at once with :class:`Overloaded`
(429 / RESOURCE_EXHAUSTED) rather than queued without bound, and one cancelled while it waits is
dropped before it decodes anything.

The calling request's own thread drives its slot's worker (sends the bytes, waits for the
answer): no hand-off to a pool thread and back.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from fewshot_common.cancellation import CancellationCheck, raise_if_cancelled
from fewshot_common.cores import usable_cores
from fewshot_common.errors import Overloaded, Unavailable
from fewshot_common.images import ImageLimits
from fewshot_common.modelmeta import Preprocess

from .decode_isolation import DecodeWorker

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
        self._free = list(range(workers))  # slots not decoding
        self._closed = False
        # Each started on its slot's first job (a pool nobody decodes with starts no process).
        self.processes = [DecodeWorker() for _ in range(workers)]

    def load_batch(
        self,
        images: Sequence[bytes],
        pre: Preprocess,
        limits: ImageLimits,
        cancellation: CancellationCheck | None = None,
    ) -> np.ndarray:
        """A request's images decoded and preprocessed in a worker: ``[N, 3, S, S]`` float32."""
        with self._slot(cancellation) as slot:
            return self.processes[slot].load_batch(images, pre, limits, cancellation)

    def load_batch_and_copies(
        self,
        images: Sequence[bytes],
        pre: Preprocess,
        limits: ImageLimits,
        cancellation: CancellationCheck | None = None,
    ) -> tuple[np.ndarray, list[bytes]]:
        """The model input and the stored copies (stored_images.py) of an example upload, in one worker job."""
        with self._slot(cancellation) as slot:
            return self.processes[slot].load_batch_and_copies(images, pre, limits, cancellation)

    def run(self, job: Callable[[], T], cancellation: CancellationCheck | None = None) -> T:
        """Run ``job`` on this thread once a slot is free and return its result (a job that
        decodes nothing untrusted; decodes go through :meth:`load_batch`)."""
        with self._slot(cancellation):
            return job()

    @contextlib.contextmanager
    def _slot(self, cancellation: CancellationCheck | None) -> Iterator[int]:
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._admitted >= self.workers + self.max_queued:
                raise Overloaded(
                    f"the server is busy: {self.workers} image decodes running and "
                    f"{self.max_queued} waiting; retry shortly"
                )
            self._admitted += 1
            while not self._free:
                self._cond.wait()
            slot = self._free.pop()
        try:
            # A request cancelled while it queued must not start decoding.
            raise_if_cancelled(cancellation, "decoding its images")
            yield slot
        finally:
            with self._cond:
                self._free.append(slot)
                self._admitted -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new jobs, wait for the admitted ones to finish, then stop the workers."""
        with self._cond:
            self._closed = True
            while self._admitted:
                self._cond.wait()
        for process in self.processes:
            process.stop()
