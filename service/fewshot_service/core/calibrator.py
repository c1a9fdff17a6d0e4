"""When and from what each namespace's open-set :class:`~..classify.open_set.Calibration` is
computed: from the registry's examples, once per namespace state, on the request for a small
namespace and in the background from a sample for a large one (see :mod:`..classify.open_set`
for the math and the figures behind these numbers).

Here, not beside the math, because it reads the registry: the math stays importable without it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ..classify.open_set import (
    Calibration,
    calibrate_rows,
    calibrate_snapshot,
    loo_rows_against,
    sampled_labels,
)

if TYPE_CHECKING:
    from ..classify.snapshot import PrototypeSet
    from ..registry.registry import Registry

# Examples per class used to calibrate (the calibration cost per namespace change is bounded).
MAX_EXAMPLES_PER_CLASS = 64
# Up to this many classes a namespace is calibrated from all of them, on the request that first
# sees a new state (at most 256 x 64 examples against 256 classes: small enough to do inline).
# Larger ones: sampled, in the background.
SYNC_CALIBRATION_CLASSES = 256
SAMPLED_CLASSES = 128
SAMPLED_EXAMPLES_PER_CLASS = 4
# A large namespace is recalibrated at most this often, and never more than 1/BUSY_FRACTION of the
# time its last calibration took (continuous adds must not keep a core busy recalibrating).
REFRESH_INTERVAL_S = 5.0
BUSY_FRACTION = 0.1


class OpenSetCalibrator:
    """One :class:`Calibration` per namespace, rebuilt when the namespace's state changes:
    on the request for a small namespace, in the background (sampled) for a large one."""

    def __init__(self, registry: Registry, max_examples_per_class: int = MAX_EXAMPLES_PER_CLASS) -> None:
        self._registry = registry
        self._max_examples_per_class = max_examples_per_class
        self._cache: dict[str, tuple[tuple[str, int], Calibration]] = {}
        self._lock = threading.Lock()
        # Large namespaces: one recalibration at a time (one thread; it competes with inference).
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibrate")
        self._pending: set[str] = set()
        self._next_allowed: dict[str, float] = {}  # monotonic time of a namespace's next refresh

    def calibration(self, namespace: str, prototypes: PrototypeSet) -> Calibration:
        """The calibration for ``prototypes``' state of ``namespace`` (or a newer one; for a large
        namespace possibly an older one while a newer is computed)."""
        state = (prototypes.epoch, prototypes.generation)
        with self._lock:
            cached = self._cache.get(namespace)
        if cached is not None and cached[0] == state:
            return cached[1]
        if len(prototypes.classifier) <= SYNC_CALIBRATION_CLASSES:  # not .labels: a sort per state
            # Fetched and computed outside the lock; two racing requests both compute, one wins.
            return self._recalibrate(namespace, prototypes.model_id)
        self._schedule(namespace, prototypes)
        if cached is not None and cached[0][0] == prototypes.epoch:
            return cached[1]
        return Calibration(np.zeros(0))  # the defaults until the first one

    def _schedule(self, namespace: str, prototypes: PrototypeSet) -> None:
        now = time.monotonic()
        with self._lock:
            if namespace in self._pending or now < self._next_allowed.get(namespace, 0.0):
                return
            self._pending.add(namespace)
        try:
            self._background.submit(self._recalibrate_in_background, namespace, prototypes)
        except RuntimeError:  # shut down: keep serving the calibration we have
            with self._lock:
                self._pending.discard(namespace)

    def _recalibrate_in_background(self, namespace: str, prototypes: PrototypeSet) -> None:
        started = time.monotonic()
        try:
            labels = sampled_labels(prototypes.labels, SAMPLED_CLASSES)
            sample = self._registry.example_snapshot(
                namespace,
                SAMPLED_EXAMPLES_PER_CLASS,
                only_labels=labels,
                only_their_means=True,
                model_id=prototypes.model_id,
            )
            top1, scores, own, fresh = loo_rows_against(prototypes.classifier, sample)
            calibration = calibrate_rows(top1, scores, own, fit_scores=fresh)
            self._store(namespace, (sample.epoch, sample.generation), calibration)
        except Exception:  # noqa: BLE001 -- a failed refresh keeps the last calibration
            logging.getLogger(__name__).warning("recalibrating a namespace failed", exc_info=True)
        finally:
            took = time.monotonic() - started
            with self._lock:
                self._pending.discard(namespace)
                self._next_allowed[namespace] = started + max(REFRESH_INTERVAL_S, took / BUSY_FRACTION)

    def _recalibrate(self, namespace: str, model_id: str | None) -> Calibration:
        # The examples of the model the prototypes are of (a namespace may hold several models').
        snapshot = self._registry.example_snapshot(namespace, self._max_examples_per_class, model_id=model_id)
        calibration = calibrate_snapshot(snapshot)
        self._store(namespace, (snapshot.epoch, snapshot.generation), calibration)
        return calibration

    def _store(self, namespace: str, state: tuple[str, int], calibration: Calibration) -> None:
        with self._lock:
            cached = self._cache.get(namespace)
            # A slower computation of an older state never replaces a newer one.
            if cached is None or cached[0][0] != state[0] or cached[0][1] <= state[1]:
                self._cache[namespace] = (state, calibration)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Until no background calibration is pending (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
