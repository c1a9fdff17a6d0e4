"""Each replica's copy of a namespace's prototypes per model, kept in step with Redis.

The replica caches one ready :class:`PrototypeSet` per (namespace, model) and revalidates it with
one HMGET of the namespace's state per request (epoch, generation, and the example and embedded
counts), so a change is seen by every replica on its next request. A replica that is behind
fetches only the classes changed since its generation (changes_since.lua) and patches its matrix;
it reloads everything only when the epoch changed or the change log no longer reaches back. A
change of any model's prototypes bumps the generation and logs the label, so this works per model.
"""

from __future__ import annotations

import threading

import numpy as np

from fewshot_common.counts import LockedCounts
from fewshot_common.errors import FailedPrecondition

from ..classify.prototypes import PrototypeMatrix, ScanStats
from ..classify.snapshot import PrototypeSet
from .keys import decode, redis_errors, text
from .reads import Reads
from .store import FLOAT32_LE, Store
from .types import ModelIncompleteError

# Beyond this many changed classes one full reload is cheaper than patching (and Lua's unpack()
# of the labels stays far below its C stack limit).
MAX_PATCHED_CLASSES = 4096


class SyncStats(LockedCounts):
    """How a replica caught up with Redis (tests, benchmarks): ``full`` reloads and ``patch``es of
    the changed classes."""

    def __init__(self) -> None:
        super().__init__("full", "patch")


class PrototypeCache:
    """This replica's prototype matrices, one per (namespace, model); safe to share between threads."""

    def __init__(self, store: Store, reads: Reads) -> None:
        self._store = store
        self._reads = reads
        self.sync_stats = SyncStats()
        self.scan_stats = ScanStats()  # how this replica's int8 copies answered
        self._cache: dict[tuple[str, str], PrototypeSet] = {}
        self._cache_lock = threading.Lock()
        # One sync per (namespace, model) at a time: requests that find it stale wait for it.
        self._sync_locks: dict[tuple[str, str], threading.Lock] = {}

    def is_cached(self, namespace: str, model_id: str) -> bool:
        """Whether this replica holds a matrix of ``namespace`` under ``model_id`` (maybe stale)."""
        with self._cache_lock:
            return (namespace, model_id) in self._cache

    def forget(self, namespace: str) -> None:
        """Free this replica's matrices of ``namespace`` now (it was deleted)."""
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == namespace]:
                del self._cache[key]

    def clear(self) -> None:
        """Forget every matrix, as a replica that never answered for any namespace."""
        with self._cache_lock:
            self._cache.clear()

    def prototypes(self, namespace: str, expected_model_id: str | None = None) -> PrototypeSet:
        """The namespace's prototype matrix under ``expected_model_id`` (None: the namespace's
        only model), from this replica's cache while it is current.

        Raises FailedPrecondition when the namespace has no classes, and
        :class:`ModelIncompleteError` when the model lacks embeddings of some of its examples.
        """
        model_id = expected_model_id or self._reads.only_model(namespace)
        status = self._reads.status(namespace, model_id)
        if status.examples <= 0:
            raise FailedPrecondition(
                f"namespace {namespace!r} has no classes yet: add examples to a class first"
            )
        if not status.complete:
            raise ModelIncompleteError(namespace, model_id, status)
        with self._cache_lock:
            cached = self._cache.get((namespace, model_id))
        if cached is None or (cached.epoch, cached.generation) != status.version:
            cached = self._sync(namespace, model_id, status.version)
        return cached

    def _sync(self, namespace: str, model_id: str, version: tuple[str, int]) -> PrototypeSet:
        """Bring this replica's copy of ``namespace`` under ``model_id`` to Redis's current state
        (at least ``version``, which the caller read after its own writes: read-your-write)."""
        key = (namespace, model_id)
        with self._cache_lock:
            lock = self._sync_locks.setdefault(key, threading.Lock())
        with lock:
            with self._cache_lock:
                cached = self._cache.get(key)
            if cached is not None and (cached.epoch, cached.generation) == version:
                return cached  # another request synced it while this one waited
            fresh = None
            if cached is not None and cached.epoch == version[0] and cached.epoch:
                fresh = self._fetch_changes(namespace, model_id, cached)
            how = "patch"
            if fresh is None:
                fresh, how = self._fetch_prototypes(namespace, model_id), "full"
            with self._cache_lock:
                self._cache[key] = fresh
            self.sync_stats.add(how)
            return fresh

    def _fetch_changes(self, namespace: str, model_id: str, cached: PrototypeSet) -> PrototypeSet | None:
        """``cached`` patched with the classes changed since it, or None: reload in full."""
        keys = self._store.keys(namespace)
        max_changes = min(MAX_PATCHED_CLASSES, max(256, len(cached.classifier) // 2))
        with redis_errors(self._store.client):
            reply = self._store.scripts.changes_since(
                keys=[keys.state, keys.changes, keys.model(model_id).prototypes],
                args=[cached.epoch, cached.generation, max_changes],
            )
        epoch, generation, outcome, *changed = reply
        if text(outcome) != "patch":
            return None
        changes = {
            decode(changed[i]): None if blob is None else np.frombuffer(blob, dtype=FLOAT32_LE)
            for i, blob in zip(range(0, len(changed), 2), changed[1::2])
        }
        if any(row is not None and len(row) != cached.classifier.dim for row in changes.values()):
            return None  # the namespace was emptied and restarted by a model of another width
        return PrototypeSet(
            classifier=cached.classifier.patched(changes) if changes else cached.classifier,
            model_id=model_id,
            generation=int(generation),
            epoch=text(epoch),
        )

    def _fetch_prototypes(self, namespace: str, model_id: str) -> PrototypeSet:
        keys = self._store.keys(namespace)
        client = self._store.client
        with redis_errors(client):
            # One MULTI: generation and prototypes come from the same instant.
            pipe = client.pipeline(transaction=True)
            pipe.hmget(keys.state, "epoch", "generation")
            pipe.hgetall(keys.model(model_id).prototypes)
            (epoch, generation), raw = pipe.execute()
        labels = [decode(f) for f in raw]
        if raw:
            matrix = np.frombuffer(b"".join(raw.values()), dtype=FLOAT32_LE).reshape(len(raw), -1)
        else:
            matrix = np.zeros((0, 0), dtype=np.float32)
        return PrototypeSet(
            classifier=PrototypeMatrix(labels, matrix, self.scan_stats),
            model_id=model_id,
            generation=int(generation or 0),
            epoch=text(epoch or b""),
        )
