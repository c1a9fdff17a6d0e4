"""Per example of a class, the nearest *other* class (label, exact score): what the shot-quality
warnings compare each example with (shot_quality.py). Answering it from scratch is a top-2 over
every prototype of the namespace, per example; this keeps the answers of recently asked classes
and carries them from one version of a namespace's :class:`PrototypeMatrix` to the next by the
changed rows alone, so a class asked again after other classes changed costs O(cached examples x
changed classes), not O(namespace).

The answers are the top-2's exactly: classes ordered by exact score (:func:`exact_scores`), then
by label, the class's own label left out. When class ``x`` changes, each cached example ``e``
with nearest other ``b`` (score ``s_b``) and new score ``s_x = e . x``:

- ``x`` is ``b``: still nearest when its score did not fall (the others did not change), else the
  entry is dropped (some other class may now be nearer) and asked afresh on its next request;
- ``x`` is another class: nearest now when ``(-s_x, x) < (-s_b, b)``;
- ``x`` was deleted: entries whose ``b`` it was are dropped.

The cached examples sit in one buffer, so BLAS scores all of them against a changed row in one
product; only the examples it cannot decide (within :func:`blas_error_bound` of their nearest, or
whose nearest is the changed class) are re-scored exactly, so the answers stay bit-identical to a
fresh top-2.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

from .exact import blas_error_bound, exact_scores

Nearest = tuple[str | None, float | None]  # (label, exact score) or (None, None): no other class

# Example rows kept at most per namespace lineage (float32 [rows, D]); the least recently asked
# classes go first. A patch costs one [rows x D] . [D] product per changed class.
DEFAULT_MAX_ROWS = 2048


class NearestOthers:
    """The cache one lineage of a namespace's matrix versions shares; valid for one version."""

    def __init__(self, version: object, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self._lock = threading.Lock()
        self._max_rows = max_rows
        self._version = version  # the matrix version the entries hold for
        self._slots: OrderedDict[str, list[int]] = OrderedDict()  # class -> its rows, LRU order
        # Rows grow by doubling up to max_rows: a namespace asked about a few classes holds a few.
        self._free: list[int] = []
        self._vectors: np.ndarray | None = None  # [capacity, D], allocated on the first entry
        self._owner = np.full(0, None, dtype=object)  # per row: its class (None: free)
        self._best = np.full(0, None, dtype=object)  # per row: its nearest other class
        self._score = np.full(0, -np.inf, dtype=np.float32)  # and that class's exact score
        self.hits = 0  # answered from the cache (tests, benchmarks)
        self.misses = 0

    def lookup(
        self, version: object, label: str, vectors: np.ndarray, compute: Callable[[], list[Nearest]]
    ) -> list[Nearest]:
        """``label``'s examples ``vectors``' nearest others in ``version``: cached, or
        ``compute()``d and kept (when ``version`` is the one this cache follows)."""
        with self._lock:
            slots = self._slots.get(label) if self._version is version else None
            if slots is not None and self._vectors is not None:
                if len(slots) == len(vectors) and np.array_equal(self._vectors[slots], vectors):
                    self._slots.move_to_end(label)
                    self.hits += 1
                    return [
                        (best, None if best is None else float(score))
                        for best, score in zip(self._best[slots], self._score[slots])
                    ]
        answer = compute()
        with self._lock:
            self.misses += 1
            if self._version is version and 0 < len(vectors) <= self._max_rows:
                self._put(label, np.asarray(vectors, dtype=np.float32), answer)
        return answer

    def _put(self, label: str, vectors: np.ndarray, answer: list[Nearest]) -> None:
        if self._vectors is None or self._vectors.shape[1] != vectors.shape[1]:
            self._slots.clear()
            self._free = []
            self._vectors = np.zeros((0, vectors.shape[1]), dtype=np.float32)
            self._owner = np.full(0, None, dtype=object)
            self._best = np.full(0, None, dtype=object)
            self._score = np.full(0, -np.inf, dtype=np.float32)
        self._forget(label)
        while len(self._free) < len(vectors) and len(self._owner) < self._max_rows:
            self._grow(min(self._max_rows, max(64, 2 * len(self._owner))))
        while len(self._free) < len(vectors):
            self._forget(next(iter(self._slots)))
        slots = [self._free.pop() for _ in range(len(vectors))]
        self._vectors[slots] = vectors
        self._owner[slots] = label
        self._best[slots] = [best for best, _ in answer]
        self._score[slots] = [-np.inf if score is None else score for _, score in answer]
        self._slots[label] = slots

    def _grow(self, capacity: int) -> None:
        assert self._vectors is not None
        old = len(self._owner)
        vectors = np.zeros((capacity, self._vectors.shape[1]), dtype=np.float32)
        vectors[:old] = self._vectors
        self._vectors = vectors
        self._owner = np.concatenate([self._owner, np.full(capacity - old, None, dtype=object)])
        self._best = np.concatenate([self._best, np.full(capacity - old, None, dtype=object)])
        self._score = np.concatenate([self._score, np.full(capacity - old, -np.inf, dtype=np.float32)])
        self._free.extend(range(capacity - 1, old - 1, -1))

    def _forget(self, label: str) -> None:
        slots = self._slots.pop(label, None)
        if slots:
            self._owner[slots] = None
            self._best[slots] = None
            self._score[slots] = -np.inf
            self._free.extend(slots)

    @property
    def rows(self) -> int:
        """Example rows held now (at most ``max_rows``)."""
        with self._lock:
            return sum(len(slots) for slots in self._slots.values())

    def _forget_all(self) -> None:
        for label in list(self._slots):
            self._forget(label)

    def follow(
        self,
        old: object,
        new: object,
        changes: Mapping[str, np.ndarray | None],
        unit_row: Callable[[str], np.ndarray | None],
    ) -> None:
        """Carry the entries from version ``old`` to ``new`` (``old`` patched with ``changes``;
        ``unit_row`` gives ``new``'s re-normalised rows). From any other version: start empty."""
        with self._lock:
            if self._version is not old:
                self._forget_all()
            elif self._slots and changes:
                for label in sorted(changes):  # one at a time: each step leaves exact answers
                    self._apply(label, unit_row(label))
            self._version = new

    def _apply(self, changed: str, row: np.ndarray | None) -> None:
        assert self._vectors is not None
        used = self._owner != None  # noqa: E711 -- elementwise over an object array
        had_it = used & (self._best == changed)
        if row is None:  # deleted: every class with an example it was nearest to asks again
            self._drop_owners(np.flatnonzero(had_it))
            return
        blas = self._vectors @ row
        norms = np.linalg.norm(self._vectors, axis=1)
        margin = 2 * blas_error_bound(len(row), norms)  # type: ignore[arg-type]
        # Rows BLAS cannot decide: the changed class may beat (or tie) their nearest, or it is it.
        undecided = used & (self._owner != changed) & (had_it | (blas >= self._score - margin))
        lost: list[int] = []
        for i in np.flatnonzero(undecided).tolist():
            score = float(exact_scores(row[None, :], self._vectors[i])[0])
            best, best_score = self._best[i], float(self._score[i])
            if best == changed:
                if score < best_score:
                    lost.append(i)  # its nearest moved away: another class may be nearer now
                else:
                    self._score[i] = score
            elif best is None or (-score, changed) < (-best_score, best):
                self._best[i], self._score[i] = changed, score
        self._drop_owners(np.asarray(lost, dtype=np.int64))

    def _drop_owners(self, rows: np.ndarray) -> None:
        for owner in {self._owner[i] for i in rows.tolist()}:
            self._forget(owner)
