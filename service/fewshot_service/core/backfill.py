"""Embedding a namespace's examples with this server's model, from their stored images.

Two ways, both through the core's own embed path (decode pool, limits, batcher):

- **on demand** (:meth:`Backfiller.fill_on_demand`): a Classify that finds at most
  ``on_demand_limit`` examples without this model's embedding (typically added a moment ago on
  a replica of another model) embeds them itself, then classifies;
- **in the background** (:meth:`Backfiller.request`): more than that, and one worker thread per
  server works through the namespace in batches while Classify answers 409 with the progress.
  Replicas coordinate through a lease in Redis per (namespace, model) (``SET NX PX`` with a
  random token, renewed after each batch, released at the end; it expires if the holder dies),
  so one replica per model backfills a namespace at a time. What a pass could not embed (no
  stored image) is recorded, so requests do not start passes that cannot help.

Writes skip examples deleted meanwhile (model_store.fill); the worker stops between batches on
shutdown and releases its lease.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fewshot_common.cancellation import CancellationCheck
from fewshot_common.errors import FewshotError, ImageError

from ..registry.model_store import MissingExample, ModelStore

log = logging.getLogger(__name__)

DEFAULT_ON_DEMAND_LIMIT = 32
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEASE_MS = 30_000

EmbedFn = Callable[[Sequence[bytes], "CancellationCheck | None"], np.ndarray]


@dataclass(frozen=True)
class FillResult:
    filled: int  # embeddings written
    without_image: int  # missing examples with no (usable) stored image


class Backfiller:
    """This server's backfill of its own model: on demand and by one background worker."""

    def __init__(
        self,
        store: ModelStore,
        model_id: str,
        embed: EmbedFn,
        *,
        on_demand_limit: int = DEFAULT_ON_DEMAND_LIMIT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        lease_ms: int = DEFAULT_LEASE_MS,
    ) -> None:
        self.store = store
        self.model_id = model_id
        self.on_demand_limit = on_demand_limit
        self.batch_size = batch_size
        self.lease_ms = lease_ms
        self._embed = embed
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._busy: str | None = None  # the namespace the worker is on
        self._sweep: Callable[[], list[str]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fill_locks: dict[str, threading.Lock] = {}
        self.passes = 0  # completed background passes (tests, logs)

    # -- on demand -----------------------------------------------------------------------------

    def fill_on_demand(
        self, namespace: str, cancellation: CancellationCheck | None = None
    ) -> FillResult | None:
        """Embed the few examples this model lacks, or None when there are more than
        ``on_demand_limit`` (a background pass is for those). One request per namespace at a
        time fills; the others wait for it rather than embed the same images again."""
        with self._cond:
            lock = self._fill_locks.setdefault(namespace, threading.Lock())
        with lock:
            missing = self.store.missing(namespace, self.model_id, self.on_demand_limit + 1)
            if len(missing.examples) > self.on_demand_limit:
                return None
            result = self._fill(namespace, missing.epoch, missing.examples, cancellation)
            if result.without_image:  # recorded, so requests skip this until the namespace changes
                generation = self.store.registry.generation(namespace)
                self.store.record(namespace, self.model_id, result.without_image, generation)
            return result

    def _fill(
        self,
        namespace: str,
        epoch: str,
        examples: Sequence[MissingExample],
        cancellation: CancellationCheck | None,
    ) -> FillResult:
        images = self.store.stored_images(namespace, examples)
        usable = [(e, image) for e, image in zip(examples, images) if image]
        without_image = sum(1 for image in images if image == b"")  # None: deleted meanwhile
        vectors, ok = self._embed_usable([image for _, image in usable], cancellation)
        without_image += int((~ok).sum())
        kept = [e for (e, _), good in zip(usable, ok) if good]
        filled = self.store.fill(namespace, self.model_id, epoch, kept, vectors) if kept else 0
        return FillResult(filled, without_image)

    def _embed_usable(
        self, images: list[bytes], cancellation: CancellationCheck | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the images that decode, and which did (a stored copy that the current
        limits refuse is skipped, not fatal to the batch)."""
        ok = np.ones(len(images), dtype=bool)
        while True:
            todo = [image for image, good in zip(images, ok) if good]
            if not todo:
                return np.zeros((0, 1), np.float32), ok
            try:
                return self._embed(todo, cancellation), ok
            except ImageError as exc:  # other errors (busy, cancelled, Redis) are the caller's
                bad = np.flatnonzero(ok)[exc.index]
                log.warning("backfill: a stored image of model %s cannot be embedded: %s", self.model_id, exc)
                ok[bad] = False

    # -- in the background ---------------------------------------------------------------------

    def _start(self) -> None:
        """Start the worker (with the lock held): on the first request, so a core that never
        needs a backfill never runs a thread."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="fewshot-backfill", daemon=True)
            self._thread.start()

    def request(self, namespace: str) -> None:
        """Queue a background pass over ``namespace`` (no-op when queued or running)."""
        with self._cond:
            if namespace != self._busy and namespace not in self._queue and not self._stop.is_set():
                self._queue.append(namespace)
                self._start()
                self._cond.notify()

    def request_incomplete(self, find: Callable[[], list[str]]) -> None:
        """At start-up: queue every namespace ``find()`` names (those this model has not fully
        embedded), looked up in the worker so a slow or absent Redis does not delay the start."""
        with self._cond:
            self._sweep = find
            self._start()
            self._cond.notify()

    def pending(self, namespace: str) -> bool:
        """Queued or running here."""
        with self._cond:
            return namespace == self._busy or namespace in self._queue

    def stop(self, wait: bool = True) -> None:
        """Stop after the batch in progress (its lease released); ``wait`` joins the worker."""
        self._stop.set()
        with self._cond:
            self._queue.clear()
            self._cond.notify_all()
        if wait and self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self._sweep is None and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                sweep, self._sweep = self._sweep, None
            if sweep is not None:
                try:
                    for namespace in sweep():
                        self.request(namespace)
                except Exception:
                    log.exception("could not list the namespaces model %s has yet to embed", self.model_id)
                continue
            with self._cond:
                if not self._queue:
                    continue
                namespace = self._busy = self._queue.pop(0)
            try:
                self.backfill(namespace)
            except Exception:  # Redis away, a bug: logged; a later request queues it again
                log.exception(
                    "backfill of a namespace for model %s failed; it is retried on demand", self.model_id
                )
            finally:
                with self._cond:
                    self._busy = None
                    self.passes += 1
                    self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (tests, benchmarks)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and self._busy is None and self._sweep is None, timeout
            )

    def backfill(self, namespace: str) -> FillResult | None:
        """One pass over ``namespace`` under the lease; None when another replica holds it.
        Runs in the worker thread (or the caller's, in tests and benchmarks)."""
        token = uuid.uuid4().hex
        if not self.store.try_lease(namespace, self.model_id, token, self.lease_ms):
            return None
        filled = without_image = 0
        try:
            batches = self.store.iter_missing(namespace, self.model_id)
            epoch = next(batches).epoch
            pending: list[MissingExample] = []
            for batch in itertools.chain(batches, [None]):
                pending += batch.examples if batch is not None else []
                while pending and (len(pending) >= self.batch_size or batch is None):
                    if self._stop.is_set():
                        return FillResult(filled, without_image)
                    chunk, pending = pending[: self.batch_size], pending[self.batch_size :]
                    result = self._fill(namespace, epoch, chunk, None)
                    filled, without_image = filled + result.filled, without_image + result.without_image
                    if not self.store.renew_lease(namespace, self.model_id, token, self.lease_ms):
                        log.warning("backfill lease lost (expired?); another replica continues")
                        return FillResult(filled, without_image)
            generation = self.store.registry.generation(namespace)
            self.store.record(namespace, self.model_id, without_image, generation)
            if filled or without_image:
                log.info(
                    "backfill for model %s: %d embeddings computed from stored images, %d "
                    "examples without one (re-upload them)",
                    self.model_id,
                    filled,
                    without_image,
                )
            return FillResult(filled, without_image)
        finally:
            try:
                self.store.release_lease(namespace, self.model_id, token)
            except FewshotError:  # Redis away: the lease expires by itself
                pass
