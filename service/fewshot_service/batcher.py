"""Dynamic batching: concurrent requests merged into one model run, invisibly to callers.

Callers hand in their own preprocessed ``[n, 3, S, S]`` array and get back exactly their own
``[n, D]`` rows. A worker thread takes the oldest request, then keeps adding queued requests
until the batch holds ``max_batch_size`` images or the oldest request has waited
``max_queue_delay_ms``. Requests that arrive while a batch runs are already late by the time the
worker comes back, so under load batches fill without any added wait (the knobs of Triton's
``max_queue_delay_microseconds`` and Ray Serve's ``batch_wait_timeout_s``).

The wait applies only while another batch is running: with the model idle, whatever is queued
runs at once, since waiting for company that may never come only adds latency (one client
measured 122 images/s with the wait against 161 without batching; bench/bench_served.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import inference_metrics as metrics
from fewshot_common.cancellation import CancellationCheck, raise_if_cancelled
from fewshot_common.errors import Cancelled, Unavailable


@dataclass(frozen=True)
class BatchConfig:
    """Knobs of the dynamic batcher. ``enabled=False`` runs each request on its own thread.

    ``workers`` merged batches may run at once (each on its own thread): more than one keeps
    the model busy while another batch's results are handed back, and lets ONNX Runtime's
    calling threads work in parallel on CPU.
    """

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    enabled: bool = True
    # One: a second worker gathers the next batch while the first runs, then runs it beside the
    # first, and two ORT runs on one session share its intra-op threads. bench/bench_served.py,
    # 16 clients in another process, 2-core Xeon (AMX), v1 int8, two runs: 1 worker 261.6 and
    # 267.4 images/s (p99 86 and 90 ms), 2 workers 241.3 and 262.4 (p99 118 and 109 ms), no
    # batching 235.5 and 253.9. (Before the batcher stopped waiting with the model idle, more
    # workers hid that wait: 2 measured faster than 1 then.) A GPU host may want 2: not measured.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0 or self.max_queue_delay_ms < 0 or self.workers <= 0:
            raise ValueError(
                f"need max_batch_size > 0, max_queue_delay_ms >= 0 and workers > 0, got {self}"
            )


@dataclass
class _Request:
    pixels: np.ndarray
    cancellation: CancellationCheck | None = None
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[np.ndarray] = field(default_factory=Future)

    def dropped_if_cancelled(self) -> bool:
        """Fail a cancelled request's future (its caller is gone) and say whether it was."""
        if self.cancellation is None or not self.cancellation.is_cancelled():
            return False
        self.future.set_exception(
            Cancelled("the request was cancelled (deadline passed or client gone) before inference")
        )
        return True


class DynamicBatcher:
    """Merges concurrent :meth:`submit` calls into runs of ``run`` (``[N, ...] -> [N, D]``)."""

    def __init__(
        self, run: Callable[[np.ndarray], np.ndarray], config: BatchConfig = BatchConfig()
    ) -> None:
        self._run = run
        self.config = config
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0  # batches in the model now; the queue delay applies only when > 0
        self._workers: list[threading.Thread] = []
        if config.enabled:
            for number in range(config.workers):
                worker = threading.Thread(
                    target=self._loop, name=f"fewshot-batcher-{number}", daemon=True
                )
                worker.start()
                self._workers.append(worker)

    def submit(
        self, pixels: np.ndarray, cancellation: CancellationCheck | None = None
    ) -> np.ndarray:
        """Embed ``pixels`` (blocking); the result rows are this call's, in its order.

        A request whose ``cancellation`` is set before its batch leaves the queue is dropped
        from it and raises :class:`Cancelled`; one already in a running batch completes.
        """
        raise_if_cancelled(cancellation, "inference")
        if not self.config.enabled:
            return self._timed_run(pixels)
        request = _Request(pixels, cancellation)
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            self._queue.append(request)
            self._cond.notify()
        return request.future.result()

    def close(self) -> None:
        """Finish the queued requests, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:  # every request in it was cancelled
                continue
            started = time.monotonic()
            for request in batch:
                metrics.QUEUE_SECONDS.observe(started - request.enqueued)
            try:
                merged = batch[0].pixels if len(batch) == 1 else np.concatenate([r.pixels for r in batch])
                vectors = self._timed_run(merged)
            except BaseException as exc:  # the callers, not this thread, must see the failure
                for request in batch:
                    request.future.set_exception(exc)
                continue
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()  # a worker gathering behind this batch may go now
            offset = 0
            for request in batch:
                request.future.set_result(vectors[offset : offset + len(request.pixels)])
                offset += len(request.pixels)

    def _next_batch(self) -> list[_Request] | None:
        """Block for the oldest request, then gather more until full, its delay is spent or no
        other batch is running. Counts the batch as running (``_loop`` uncounts it).

        Cancelled requests are dropped as they are reached, and once more as the batch leaves,
        so no model run is spent on a caller that has gone.
        """
        limit, delay = self.config.max_batch_size, self.config.max_queue_delay_ms / 1000.0
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                first = self._queue.popleft()
                if not first.dropped_if_cancelled():
                    break
            batch = [first]
            size = len(first.pixels)
            deadline = first.enqueued + delay
            while size < limit:
                if self._queue:
                    if self._queue[0].dropped_if_cancelled():
                        self._queue.popleft()
                        continue
                    if size + len(self._queue[0].pixels) > limit:
                        break  # never split a request: it keeps its place for the next batch
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].pixels)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed or self._running == 0:
                    break  # delay spent, closing, or the model idle (no company worth waiting for)
                self._cond.wait(remaining)
            batch = [request for request in batch if not request.dropped_if_cancelled()]
            if batch:
                self._running += 1
        return batch

    def _timed_run(self, pixels: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        vectors = self._run(pixels)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_IMAGES.observe(len(pixels))
        return vectors
