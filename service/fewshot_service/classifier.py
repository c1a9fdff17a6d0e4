"""Nearest-prototype classification: cosine similarity, top-k, deterministic ties.

``score`` is the cosine similarity in [-1, 1] between the image's L2-normalised embedding and the
re-normalised class prototype (the mean of the class's normalised example embeddings). It is not
a calibrated probability.

A :class:`PrototypeMatrix` is immutable for its readers, yet a change of a few classes costs
O(changed x D), not a copy of every row: rows live in a growable buffer (:class:`_RowStore`) that
only the newest version appends to. A changed class gets a fresh row at the end and its old row is
masked out, so an older version still reading the buffer sees exactly the rows it had.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

DEFAULT_TOP_K = 5
# Rebuild compactly once masked-out rows outnumber the live ones (they cost matmul time).
_MIN_ROWS_BEFORE_COMPACTING = 64


def _capacity(live: int) -> int:
    """Rows to allocate for ``live`` classes: 25% room to patch into before the next copy
    (a copy every live/4 changes costs ~4 row copies per change, amortised)."""
    return live + max(live // 4, 16)


def limit_blas_threads(threads: int = 1) -> None:
    """Process-wide: numpy's BLAS uses ``threads`` threads (the server calls this once).

    Top-k is one matrix-vector product; OpenBLAS splitting it over threads that busy-wait beside
    ONNX Runtime's own threads made it 20-30 ms instead of ~1 ms at 10k classes on 2 cores
    (bench/bench_registry_scale.py). Nothing else in the server leans on numpy's BLAS.
    """
    threadpool_limits(limits=threads, user_api="blas")


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    # P(this label is right), from the score's margin over the best other class (open_set.py).
    confidence: float | None = None


class _RowStore:
    """Append-only rows shared by successive versions of one namespace's matrix.

    Slots below ``used`` are never written again, so every version that read ``[:n]`` keeps
    seeing the same rows; only the version whose ``n == used`` (the newest) may append, and
    ``slot_of`` (label -> its newest live slot) describes that newest version only.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        self.unit = np.zeros((max(capacity, 1), dim), dtype=np.float32)  # re-normalised rows
        self.norms = np.zeros(max(capacity, 1), dtype=np.float32)  # of the class means
        self.labels: list[str] = []  # per slot, appended in step with the rows
        self.slot_of: dict[str, int] = {}
        self.used = 0
        self.lock = threading.Lock()

    def append(self, rows: np.ndarray, labels: Sequence[str]) -> None:
        """Caller holds ``lock`` (or owns a new store) and has checked there is room."""
        start, end = self.used, self.used + len(rows)
        norms = np.linalg.norm(rows, axis=1)
        self.unit[start:end] = rows / np.maximum(norms, 1e-12)[:, None]
        self.norms[start:end] = norms
        self.labels.extend(labels)
        self.slot_of.update(zip(labels, range(start, end)))
        self.used = end


class PrototypeMatrix:
    """Class prototypes prepared once for many queries: rows re-normalised.

    ``labels`` lists the classes sorted; ``prototypes`` (the class means as given) and ``matrix``
    (re-normalised) are rows in that order. Ties in :meth:`top_k` break by label, so they never
    depend on the order Redis returned the classes in or on the order rows were patched in.
    """

    def __init__(self, labels: Sequence[str], matrix: np.ndarray) -> None:
        matrix = np.asarray(matrix, dtype=np.float32)
        if len(labels) != len(matrix) or matrix.ndim != 2:
            raise ValueError(f"{len(labels)} labels for a prototype matrix of shape {matrix.shape}")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        store = _RowStore(_capacity(len(labels)), matrix.shape[1])
        store.append(matrix, labels)
        self._init(store, np.zeros(len(labels), dtype=bool))

    def _init(self, store: _RowStore, dead: np.ndarray) -> None:
        self._store = store
        self._slots = len(dead)  # this version sees store rows [:slots]
        self._dead = dead  # [slots] True where a row is masked out (replaced or deleted)
        self._dead_rows = int(dead.sum())
        self.dim = store.unit.shape[1]

    @classmethod
    def _version(cls, store: _RowStore, dead: np.ndarray) -> "PrototypeMatrix":
        version = cls.__new__(cls)
        version._init(store, dead)
        return version

    def __len__(self) -> int:
        return self._slots - self._dead_rows

    @property
    def dead_rows(self) -> int:
        """Rows masked out (replaced or deleted classes) that queries still multiply."""
        return self._dead_rows

    @property
    def nbytes(self) -> int:
        """Bytes of row storage this version holds (shared with its successors)."""
        return int(self._store.unit.nbytes + self._store.norms.nbytes)

    def _live_slots(self) -> np.ndarray:
        return np.flatnonzero(~self._dead)

    @cached_property
    def labels(self) -> list[str]:
        return [label for label, _ in self._labels_and_slots]

    @cached_property
    def _labels_and_slots(self) -> list[tuple[str, int]]:
        store_labels = self._store.labels
        return sorted((store_labels[slot], slot) for slot in self._live_slots().tolist())

    @cached_property
    def matrix(self) -> np.ndarray:
        """[C, D] float32, re-normalised rows in ``labels`` order."""
        rows = self._store.unit[self._rows_in_label_order()]
        rows.setflags(write=False)
        return rows

    @cached_property
    def prototypes(self) -> np.ndarray:
        """[C, D] float32, the class means as given, in ``labels`` order."""
        slots = self._rows_in_label_order()
        rows = self._store.unit[slots] * self._store.norms[slots, None]
        rows.setflags(write=False)
        return rows

    def _rows_in_label_order(self) -> np.ndarray:
        return np.array([slot for _, slot in self._labels_and_slots], dtype=np.int64)

    def patched(self, changes: Mapping[str, np.ndarray | None]) -> "PrototypeMatrix":
        """A new version with ``changes`` applied (label -> new class mean, or None: deleted).

        This version is left as it was. Costs O(changed x D) plus a copy of the [C] dead-row
        mask while the buffer has room and masked-out rows stay few; else one compacting copy.
        """
        updates = {label: row for label, row in changes.items() if row is not None}
        rows = (
            np.stack([np.asarray(r, dtype=np.float32) for r in updates.values()])
            if updates
            else np.zeros((0, self.dim), dtype=np.float32)
        )
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"patched rows of shape {rows.shape} for prototypes of size {self.dim}")
        store = self._store
        with store.lock:
            if store.used == self._slots and self._slots + len(rows) <= len(store.unit):
                # The newest version: store.slot_of is this version's map, so patch in place.
                replaced = [store.slot_of[label] for label in changes if label in store.slot_of]
                slots = self._slots + len(rows)
                dead_rows = self._dead_rows + len(replaced)
                if dead_rows <= max(slots - dead_rows, _MIN_ROWS_BEFORE_COMPACTING):
                    for label in changes:
                        store.slot_of.pop(label, None)
                    dead = np.zeros(slots, dtype=bool)
                    dead[: self._slots] = self._dead
                    dead[replaced] = True
                    store.append(rows, list(updates))
                    return PrototypeMatrix._version(store, dead)
        return self._compacted(changes, rows, list(updates))

    def _compacted(
        self, changes: Mapping[str, np.ndarray | None], rows: np.ndarray, labels: list[str]
    ) -> "PrototypeMatrix":
        """This version's unchanged live rows and the new ones, copied into a fresh buffer
        with room to grow (when the buffer is full, mostly masked, or already patched)."""
        store_labels = self._store.labels
        kept = [slot for slot in self._live_slots().tolist() if store_labels[slot] not in changes]
        live = len(kept) + len(rows)
        store = _RowStore(_capacity(live), self.dim)
        store.unit[: len(kept)] = self._store.unit[kept]
        store.norms[: len(kept)] = self._store.norms[kept]
        kept_labels = [store_labels[slot] for slot in kept]
        store.labels.extend(kept_labels)
        store.slot_of.update(zip(kept_labels, range(len(kept))))
        store.used = len(kept)
        store.append(rows, labels)
        return PrototypeMatrix._version(store, np.zeros(live, dtype=bool))

    def top_k(self, embeddings: np.ndarray, k: int) -> list[list[Prediction]]:
        """For each row of ``embeddings`` ``[N, D]`` (unit norm): the ``k`` best classes."""
        if embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embedding size {embeddings.shape[1]} does not match prototypes of size "
                f"{self.dim}"
            )
        # One matmul over every slot this version sees; masked-out rows can never be chosen.
        scores = embeddings.astype(np.float32, copy=False) @ self._store.unit[: self._slots].T
        if self._dead_rows:
            scores[:, self._dead] = -np.inf
        k = min(k, len(self))
        return [self._best(row, k) for row in scores]

    def _best(self, scores: np.ndarray, k: int) -> list[Prediction]:
        if k <= 0:
            return []
        # argpartition finds the k-th best score in O(C); everything tied with it is kept so
        # the sort below (score desc, then label asc), not argpartition's choice, decides ties.
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        candidates = np.flatnonzero(scores >= kth)
        labels = self._store.labels
        ranked = sorted(candidates.tolist(), key=lambda slot: (-scores[slot], labels[slot]))[:k]
        return [Prediction(labels[slot], float(scores[slot])) for slot in ranked]
