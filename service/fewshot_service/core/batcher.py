"""Dynamic batching: concurrent requests merged into one model run, invisibly to callers.

Callers hand in their own preprocessed ``[n, 3, S, S]`` array and get back exactly their own
``[n, D]`` rows. A worker thread takes the oldest request, then keeps adding queued requests
until the batch holds ``max_batch_size`` images or the oldest request has waited
``max_queue_delay_ms``. Requests that arrive while a batch runs are already late by the time the
worker comes back, so under load batches fill without any added wait (the knobs of Triton's
``max_queue_delay_microseconds`` and Ray Serve's ``batch_wait_timeout_s``). With several workers, a
request of several images is cut into one part per worker, which run side by side.

The wait applies only while another batch is running: with the model idle, whatever is queued
runs at once, since waiting for company that may never come only adds latency (a lone client
was much slower with the wait than without batching: docs/benchmarks/code-notes.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from fewshot_common.cancellation import CancellationCheck, raise_if_cancelled
from fewshot_common.errors import Cancelled, Unavailable

from . import metrics


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
    # Two, each running its batch on its share of the cores (intra_op_threads_per_batch): one
    # batch is gathered and handed back while the other computes, and no ONNX Runtime thread waits
    # at another run's barriers. It served the most images/s at 16 and 64 clients on 2 cores;
    # a lone client is a little slower than with one worker on both cores
    # (docs/benchmarks/code-notes.md).
    workers: int = 2

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0 or self.max_queue_delay_ms < 0 or self.workers <= 0:
            raise ValueError(f"need max_batch_size > 0, max_queue_delay_ms >= 0 and workers > 0, got {self}")


@dataclass
class _Request:
    pixels: np.ndarray
    cancellation: CancellationCheck | None = None
    caller: object = field(default_factory=object)  # the parts of one request share it; never one batch
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

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], config: BatchConfig = BatchConfig()) -> None:
        self._run = run
        self.config = config
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0  # batches in the model now; the queue delay applies only when > 0
        self._gathering = 0  # workers waiting for company for their batch
        self._workers: list[threading.Thread] = []
        if config.enabled:
            for number in range(config.workers):
                worker = threading.Thread(target=self._loop, name=f"fewshot-batcher-{number}", daemon=True)
                worker.start()
                self._workers.append(worker)

    def submit(self, pixels: np.ndarray, cancellation: CancellationCheck | None = None) -> np.ndarray:
        """Embed ``pixels`` (blocking); the result rows are this call's, in its order.

        A request whose ``cancellation`` is set before its batch leaves the queue is dropped
        from it and raises :class:`Cancelled`; one already in a running batch completes.
        """
        return self.start(pixels, cancellation)()

    def start(
        self, pixels: np.ndarray, cancellation: CancellationCheck | None = None
    ) -> Callable[[], np.ndarray]:
        """Queue ``pixels`` and return the function that waits for their rows, so that the caller
        can do other work on its own thread while the model runs (with batching off, the run
        happens when that function is called)."""
        raise_if_cancelled(cancellation, "inference")
        if not self.config.enabled:
            return lambda: self._timed_run(pixels)
        # With several workers, a request of several images is split into one part per worker, so
        # that its parts run side by side on their share of the cores instead of one after the other.
        caller = object()
        pieces = min(len(pixels), self.config.workers)
        split = [pixels] if pieces == 1 else np.array_split(pixels, pieces)  # most calls: one image
        parts = [_Request(part, cancellation, caller) for part in split]
        with self._cond:
            if self._closed:
                raise Unavailable("the server is shutting down")
            self._queue.extend(parts)
            self._cond.notify(len(parts))

        def rows() -> np.ndarray:
            if len(parts) == 1:
                return parts[0].future.result()
            for error in [part.future.exception() for part in parts]:  # waits for every part
                if error is not None:
                    raise error
            return np.concatenate([part.future.result() for part in parts])

        return rows

    def run_if_idle(
        self, pixels: np.ndarray, cancellation: CancellationCheck | None = None
    ) -> np.ndarray | None:
        """Run ``pixels`` on the calling thread if the model is idle and nothing is queued, and
        return the rows; None (nothing done) otherwise, or for a request :meth:`start` would split.

        A lone request gains nothing from a worker but two thread switches, so with the model idle
        batching runs it exactly as no batching does (at one client, equal to batching off within
        the noise: docs/benchmarks/code-notes.md).
        It counts as a running batch, so requests arriving meanwhile gather behind it and the
        workers keep the runs at once to ``workers``.
        """
        if not self.config.enabled or min(len(pixels), self.config.workers) > 1:
            return None
        with self._cond:
            if self._closed or self._queue or self._running:
                return None
            self._running += 1
        try:
            raise_if_cancelled(cancellation, "inference")
            return self._timed_run(pixels)
        finally:
            self._run_ended()

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
                self._run_ended()
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
                # A caller's own run (run_if_idle) counts, and so does a batch being gathered: no
                # more than ``workers`` runs at once, and no two workers gathering side by side
                # behind a caller's run, each with half the requests.
                while not self._queue or self._running + self._gathering >= self.config.workers:
                    if self._closed and not self._queue:
                        return None
                    self._cond.wait()
                first = self._queue.popleft()
                if not first.dropped_if_cancelled():
                    break
            batch = [first]
            callers = {first.caller}
            size = len(first.pixels)
            deadline = first.enqueued + delay
            while size < limit:
                if self._queue:
                    if self._queue[0].dropped_if_cancelled():
                        self._queue.popleft()
                        continue
                    if size + len(self._queue[0].pixels) > limit:
                        break  # never split a request: it keeps its place for the next batch
                    if self._queue[0].caller in callers:
                        break  # another part of a request in this batch: it runs beside it
                    batch.append(self._queue.popleft())
                    callers.add(batch[-1].caller)
                    size += len(batch[-1].pixels)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed or self._running == 0:
                    break  # delay spent, closing, or the model idle (no company worth waiting for)
                self._gathering += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._gathering -= 1
            batch = [request for request in batch if not request.dropped_if_cancelled()]
            if batch:
                self._running += 1
        return batch

    def _run_ended(self) -> None:
        """A run (a worker's batch or a caller's own) left the model: wake the workers if one may
        go now, a request being queued or a worker gathering behind the runs; waking idle ones
        to find nothing is pure cost."""
        with self._cond:
            self._running -= 1
            if self._queue or self._gathering:
                self._cond.notify_all()

    def _timed_run(self, pixels: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        vectors = self._run(pixels)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_IMAGES.observe(len(pixels))
        return vectors


# On a CPU a model run is best kept small: one ONNX Runtime thread runs batch 16 and 32 slower per
# image than 4 or 8, as a batch's activations outgrow the core's cache
# (docs/benchmarks/code-notes.md). A GPU wants large batches (BatchConfig's default).
CPU_MAX_BATCH_SIZE = 8
