"""Dynamic batching: concurrent requests merged into one model run, invisibly to callers.

Callers hand in their own preprocessed ``[n, 3, S, S]`` array and get back exactly their own
``[n, D]`` rows. A worker thread takes the oldest request, then keeps adding queued requests
until the batch holds ``max_batch_size`` images or the oldest request has waited
``max_queue_delay_ms``. Requests that arrive while a batch runs are already late by the time the
worker comes back, so under load batches fill without any added wait (the knobs of Triton's
``max_queue_delay_microseconds`` and Ray Serve's ``batch_wait_timeout_s``).
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
from fewshot_common.errors import Unavailable


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
    # Measured with bench_serving.concurrent_throughput (16 clients, 1 image each, vit_tiny_p8_64)
    # on 2 busy shared CPU cores: 1 worker 15-16, 2 workers 17-22, 4 workers 26-29, no batching
    # 24-31 images/s. 2 is a middle ground that also keeps a GPU fed.
    workers: int = 2

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0 or self.max_queue_delay_ms < 0 or self.workers <= 0:
            raise ValueError(
                f"need max_batch_size > 0, max_queue_delay_ms >= 0 and workers > 0, got {self}"
            )


@dataclass
class _Request:
    pixels: np.ndarray
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[np.ndarray] = field(default_factory=Future)


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
        self._workers: list[threading.Thread] = []
        if config.enabled:
            for number in range(config.workers):
                worker = threading.Thread(
                    target=self._loop, name=f"fewshot-batcher-{number}", daemon=True
                )
                worker.start()
                self._workers.append(worker)

    def submit(self, pixels: np.ndarray) -> np.ndarray:
        """Embed ``pixels`` (blocking); the result rows are this call's, in its order."""
        if not self.config.enabled:
            return self._timed_run(pixels)
        request = _Request(pixels)
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
            offset = 0
            for request in batch:
                request.future.set_result(vectors[offset : offset + len(request.pixels)])
                offset += len(request.pixels)

    def _next_batch(self) -> list[_Request] | None:
        """Block for the oldest request, then gather more until full or its delay is spent."""
        limit, delay = self.config.max_batch_size, self.config.max_queue_delay_ms / 1000.0
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            size = len(batch[0].pixels)
            deadline = batch[0].enqueued + delay
            while size < limit:
                if self._queue:
                    if size + len(self._queue[0].pixels) > limit:
                        break  # never split a request: it keeps its place for the next batch
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].pixels)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _timed_run(self, pixels: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        vectors = self._run(pixels)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_IMAGES.observe(len(pixels))
        return vectors
