"""Nearest-prototype classification: cosine similarity, top-k, deterministic ties.

``score`` is the cosine similarity in [-1, 1] between the image's L2-normalised embedding and the
re-normalised class prototype (the mean of the class's normalised example embeddings). It is not
a calibrated probability.

One rule for ranking, on every path and every CPU: classes are ordered by their *exact score*
(:func:`exact_scores`: float64 products, which are exact for float32 inputs, summed in a fixed
order and rounded once to float32), then by label. BLAS only narrows the field: its float32 dot
products round differently per CPU family (AVX2, AVX-512, AMX kernels sum in other orders), so
every row within :func:`blas_error_bound` of the k-th best BLAS score is re-scored exactly before
anything is ranked. The int8 scan, the float32 scan, a patched matrix and a rebuilt one therefore
return bit-identical scores and the same order, ties included.

A :class:`PrototypeMatrix` is immutable for its readers, yet a change of a few classes costs
O(changed x D), not a copy of every row: rows live in a growable buffer (:class:`_RowStore`) that
only the newest version appends to. A changed class gets a fresh row at the end and its old row is
masked out, so an older version still reading the buffer sees exactly the rows it had.

From :data:`INT8_SCAN_MIN_CLASSES` classes on, top-k reads an int8 copy of the buffer's rows
(int8_scan.py, built in the background and shared by every version of that buffer): its best
:data:`INT8_CANDIDATES` rows are re-scored in float32 together with the rows appended since the
copy, and the answer is used only when the copy's error bound proves it equals the float32 scan's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from threadpoolctl import threadpool_limits

from fewshot_common.counts import LockedCounts

from .exact import EXACT_CHUNK_ROWS, blas_error_bound, exact_scores
from .int8_scan import Int8Scan
from .nearest_others import Nearest, NearestOthers

# Rebuild compactly once masked-out rows outnumber the live ones (they cost matmul time).
_MIN_ROWS_BEFORE_COMPACTING = 64
# Where the int8 scan's fixed cost starts to pay against the float32 scan, between 5,000 and
# 10,000 classes of 128-wide rows (docs/benchmarks/code-notes.md).
INT8_SCAN_MIN_CLASSES = 8192
INT8_CANDIDATES = 128  # rows the int8 scan hands over for re-scoring; k above it scans in float32
# The confidence normaliser from the int8 copy (_int8_log_partition): used where its worst-case
# error (log units, the relative error of every confidence) is at most the tolerance, or where
# each approximate term's own bound, times 1/T, is at most the spread; else the float32 pass.
INT8_PARTITION_TOLERANCE = 1e-3
INT8_PARTITION_MAX_SPREAD = 0.5
# The int8 copy is rebuilt once this many rows were appended after it (and 1/16 of the buffer).
_INT8_STALE_ROWS = 2048
# One background thread builds int8 copies, one buffer at a time: a build is short next to the
# 2,048 appended rows that make the next one (docs/benchmarks/code-notes.md).
_int8_builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="int8-scan")


class ScanStats(LockedCounts):
    """How the queries that could use an int8 copy were answered (tests, benchmarks): from the
    copy's candidates (``int8``), or by the float32 scan because the bound could not rule the other
    rows out (``float32_fallback``). Passed to a matrix, shared by its patched versions."""

    def __init__(self) -> None:
        super().__init__("int8", "float32_fallback")


def _capacity(live: int) -> int:
    """Rows to allocate for ``live`` classes: 25% room to patch into before the next copy
    (a copy every live/4 changes costs ~4 row copies per change, amortised)."""
    return live + max(live // 4, 16)


def limit_blas_threads(threads: int = 1) -> None:
    """Process-wide: numpy's BLAS uses ``threads`` threads (the server calls this once).

    Top-k is one matrix-vector product; OpenBLAS splitting it over threads that busy-wait beside
    ONNX Runtime's own threads made it tens of times slower (docs/benchmarks/code-notes.md).
    Nothing else in the server leans on numpy's BLAS.
    """
    threadpool_limits(limits=threads, user_api="blas")


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    # P(this label is right): its share of the softmax over every class and "unknown" (open_set.py).
    confidence: float | None = None


def _int8_log_partition(scores: np.ndarray, inverse_temperature: float, rest: float, bound: float) -> float:
    """log(sum exp(scores / T) + exp(rest)) in float64 (``scores``: float32, -inf for masked-out
    rows; ``rest``: the int8 copy's log-sum-exp of the other live rows, each within ``bound`` of
    its float32 score). NaN where it may be off by more than the float32 pass should redo:

    - the worst case proves the error below :data:`INT8_PARTITION_TOLERANCE` (the rows the copy
      summed weigh little next to the candidates: large 1/T, a few clear best classes), or
    - ``bound / T`` is at most :data:`INT8_PARTITION_MAX_SPREAD`: each approximate term is then
      within a factor of 1.65 of its own, but the rounding errors of many rows, some up and some
      down, cancel in their sum (the worst case does not happen in practice; the test states the
      error measured on random data).
    """
    logits = scores.astype(np.float64) * inverse_temperature
    peak = max(float(logits.max(initial=-np.inf)), rest)
    if not np.isfinite(peak):
        return peak
    total = peak + float(np.log(np.exp(logits - peak).sum() + np.exp(rest - peak)))
    spread = inverse_temperature * bound
    if spread <= INT8_PARTITION_MAX_SPREAD:
        return total
    share = float(np.exp(rest - total))  # of the partition, the part the copy approximated
    worst = max(np.log1p(share * np.expm1(spread)), -np.log1p(-share * -np.expm1(-spread)))
    return total if worst <= INT8_PARTITION_TOLERANCE else float("nan")


class _RowStore:
    """Append-only rows shared by successive versions of one namespace's matrix.

    Slots below ``used`` are never written again, so every version that read ``[:n]`` keeps
    seeing the same rows; only the version whose ``n == used`` (the newest) may append, and
    ``slot_of`` (label -> its newest live slot) describes that newest version only.
    """

    def __init__(self, capacity: int, dim: int, stats: ScanStats) -> None:
        self.stats = stats
        self.unit = np.zeros((max(capacity, 1), dim), dtype=np.float32)  # re-normalised rows
        self.norms = np.zeros(max(capacity, 1), dtype=np.float32)  # of the class means
        self.labels: list[str] = []  # per slot, appended in step with the rows
        self.slot_of: dict[str, int] = {}
        self.used = 0
        self.lock = threading.Lock()
        self.int8: Int8Scan | None = None  # of rows [:int8.rows], which never change
        self.int8_building = False

    def append(self, rows: np.ndarray, labels: Sequence[str]) -> None:
        """Caller holds ``lock`` (or owns a new store) and has checked there is room."""
        start, end = self.used, self.used + len(rows)
        norms = np.linalg.norm(rows, axis=1)
        self.unit[start:end] = rows / np.maximum(norms, 1e-12)[:, None]
        self.norms[start:end] = norms
        self.labels.extend(labels)
        self.slot_of.update(zip(labels, range(start, end)))
        self.used = end

    def int8_scan(self, slots: int) -> Int8Scan | None:
        """The int8 copy a version seeing rows [:slots] can use; asks for a fresh one (in the
        background) when there is none or too many rows were appended after it."""
        scan = self.int8
        if scan is not None and scan.rows > slots:
            scan = None  # built from rows a version this old does not see
        behind = slots - (scan.rows if scan is not None else 0)
        # Only the newest version asks: a copy of fewer rows than the newest would be discarded.
        if slots == self.used and (scan is None or behind > max(_INT8_STALE_ROWS, slots // 16)):
            with self.lock:
                start, self.int8_building = not self.int8_building, True
            if start:
                try:
                    _int8_builder.submit(self._build_int8, slots)
                except RuntimeError:  # interpreter shutting down
                    pass
        return scan

    def build_int8(self, slots: int) -> Int8Scan:
        """The int8 copy of rows [:slots], built now (tests, benchmarks; else background)."""
        scan = Int8Scan(self.unit[:slots])
        with self.lock:
            if self.int8 is None or self.int8.rows < scan.rows:
                self.int8 = scan
        return scan

    def _build_int8(self, slots: int) -> None:
        try:
            self.build_int8(slots)
        except Exception:  # noqa: BLE001 -- queries keep the float32 scan
            logging.getLogger(__name__).warning("building the int8 prototype scan failed", exc_info=True)
        finally:
            with self.lock:
                self.int8_building = False


class PrototypeMatrix:
    """Class prototypes prepared once for many queries: rows re-normalised.

    ``labels`` lists the classes sorted; ``prototypes`` (the class means as given) and ``matrix``
    (re-normalised) are rows in that order. Ties in :meth:`top_k` break by label, so they never
    depend on the order Redis returned the classes in or on the order rows were patched in.
    """

    def __init__(self, labels: Sequence[str], matrix: np.ndarray, stats: ScanStats | None = None) -> None:
        matrix = np.asarray(matrix, dtype=np.float32)
        if len(labels) != len(matrix) or matrix.ndim != 2:
            raise ValueError(f"{len(labels)} labels for a prototype matrix of shape {matrix.shape}")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        store = _RowStore(
            _capacity(len(labels)), matrix.shape[1], stats if stats is not None else ScanStats()
        )
        store.append(matrix, labels)
        self._init(store, np.zeros(len(labels), dtype=bool))
        self._nearest = NearestOthers(self)  # shared with the versions patched from this one

    def _init(self, store: _RowStore, dead: np.ndarray) -> None:
        self._store = store
        self._slots = len(dead)  # this version sees store rows [:slots]
        self._dead = dead  # [slots] True where a row is masked out (replaced or deleted)
        self._dead_rows = int(dead.sum())
        self.dim = store.unit.shape[1]

    @classmethod
    def _version(cls, store: _RowStore, dead: np.ndarray) -> PrototypeMatrix:
        version = cls.__new__(cls)
        version._init(store, dead)
        return version

    def __len__(self) -> int:
        return self._slots - self._dead_rows

    @property
    def scan_stats(self) -> ScanStats:
        return self._store.stats

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

    def patched(self, changes: Mapping[str, np.ndarray | None]) -> PrototypeMatrix:
        """A new version with ``changes`` applied (label -> new class mean, or None: deleted).

        This version is left as it was. Costs O(changed x D) plus a copy of the [C] dead-row
        mask while the buffer has room and masked-out rows stay few; else one compacting copy;
        plus carrying the cached nearest others (nearest_others.py) over the changed rows.
        """
        version = self._patched(changes)
        version._nearest = self._nearest
        self._nearest.follow(self, version, changes, version.unit_row)
        return version

    def nearest_others(self, label: str, vectors: np.ndarray) -> list[Nearest]:
        """Per row of ``vectors`` (unit norm): the closest class but ``label`` and its exact
        score, (None, None) where there is none: a top-2 (the int8 scan answers large ones),
        kept for ``label`` and carried to the next versions by their changed rows alone
        (nearest_others.py), so asking again after a few changes costs no scan."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) == 0 or len(self) == 0:
            return [(None, None)] * len(vectors)

        def top_2() -> list[Nearest]:
            nearest: list[Nearest] = []
            for predictions in self.top_k(vectors, 2):
                other = next((p for p in predictions if p.label != label), None)
                nearest.append((other.label, other.score) if other is not None else (None, None))
            return nearest

        return self._nearest.lookup(self, label, vectors, top_2)

    @property
    def nearest_cache(self) -> NearestOthers:
        """The cache of :meth:`nearest_others` this version shares with its lineage (tests)."""
        return self._nearest

    def _patched(self, changes: Mapping[str, np.ndarray | None]) -> PrototypeMatrix:
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
    ) -> PrototypeMatrix:
        """This version's unchanged live rows and the new ones, copied into a fresh buffer
        with room to grow (when the buffer is full, mostly masked, or already patched)."""
        store_labels = self._store.labels
        kept = [slot for slot in self._live_slots().tolist() if store_labels[slot] not in changes]
        live = len(kept) + len(rows)
        store = _RowStore(_capacity(live), self.dim, self._store.stats)
        store.unit[: len(kept)] = self._store.unit[kept]
        store.norms[: len(kept)] = self._store.norms[kept]
        kept_labels = [store_labels[slot] for slot in kept]
        store.labels.extend(kept_labels)
        store.slot_of.update(zip(kept_labels, range(len(kept))))
        store.used = len(kept)
        store.append(rows, labels)
        return PrototypeMatrix._version(store, np.zeros(live, dtype=bool))

    def unit_row(self, label: str) -> np.ndarray | None:
        """``label``'s re-normalised row in this version (None: not a class of it).

        O(1) while ``label`` has not changed since this version; else one pass back over the
        slots (an older version read after a newer one patched that class)."""
        store = self._store
        slot = store.slot_of.get(label)
        if slot is None or slot >= self._slots or self._dead[slot]:
            slot = next(
                (s for s in range(self._slots - 1, -1, -1) if store.labels[s] == label and not self._dead[s]),
                None,
            )
        return None if slot is None else store.unit[slot]

    def top_k(self, embeddings: np.ndarray, k: int) -> list[list[Prediction]]:
        """For each row of ``embeddings`` ``[N, D]`` (unit norm): the ``k`` best classes."""
        return self._rank(embeddings, k, None)[0]

    def top_k_and_log_partition(
        self, embeddings: np.ndarray, k: int, inverse_temperature: float
    ) -> tuple[list[list[Prediction]], np.ndarray]:
        """:meth:`top_k` and :meth:`log_partition` in one scan of the rows.

        Where top-k reads the int8 copy, so does the partition: its candidates' and the rows
        appended after the copy's float32 scores, and for every other live row the copy's
        approximate score (summed by the same ONNX Runtime run that finds the candidates), so the
        partition costs about what the int8 scan does, not a float32 pass. Each approximate term
        is within a factor exp(bound / T) of its float32 one, and the rows it covers are the
        ones outside the best candidates, whose terms are the smallest: the partition's error
        stays far below the bound's (tests/test_confidence_distribution.py states it). Else the
        float32 pass of :meth:`log_partition`."""
        ranked, log_partition = self._rank(embeddings, k, inverse_temperature)
        if log_partition is None:  # ranked by the float32 scan: no int8 run summed the rows
            log_partition = self.log_partition(embeddings, inverse_temperature)
        return ranked, log_partition

    def _rank(
        self, embeddings: np.ndarray, k: int, inverse_temperature: float | None
    ) -> tuple[list[list[Prediction]], np.ndarray | None]:
        """Top-k from the int8 copy where it can answer (with ``inverse_temperature``, also its log
        partition), else from the float32 scan (and no partition)."""
        if embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embedding size {embeddings.shape[1]} does not match prototypes of size {self.dim}"
            )
        embeddings = embeddings.astype(np.float32, copy=False)
        k = min(k, len(self))
        if len(self) >= INT8_SCAN_MIN_CLASSES and k <= INT8_CANDIDATES // 2:
            scan = self._store.int8_scan(self._slots)
            if scan is not None:
                return self._top_k_int8(scan, embeddings, k, inverse_temperature)
        return [self._best(row, k, query) for row, query in zip(self._scores(embeddings), embeddings)], None

    def log_partition(self, embeddings: np.ndarray, inverse_temperature: float) -> np.ndarray:
        """Per row of ``embeddings`` [N, D]: log sum over every class of exp(score / T), the
        softmax's normaliser (open_set.py). A float32 pass over every row, the cost of one scan
        (where no int8 copy answers, and the reference its approximate sum is tested against);
        images a chunk at a time, so the temporary stays near ``EXACT_CHUNK_ROWS`` x 1024 floats
        however many classes."""
        embeddings = embeddings.astype(np.float32, copy=False)
        out = np.empty(len(embeddings), dtype=np.float64)
        per_chunk = max(1, (EXACT_CHUNK_ROWS * 1024) // max(self._slots, 1))
        for start in range(0, len(embeddings), per_chunk):
            # float32 throughout (in place): the terms are at most 1 after the shift, and a float32
            # sum of them is far more precise than any confidence is read.
            logits = self._scores(embeddings[start : start + per_chunk])
            logits *= np.float32(inverse_temperature)
            peak = logits.max(axis=1, keepdims=True)
            logits -= peak
            np.exp(logits, out=logits)
            out[start : start + per_chunk] = peak[:, 0] + np.log(logits.sum(axis=1, dtype=np.float64))
        return out

    def build_int8_scan(self) -> None:
        """Build the int8 copy for this version now, not in the background (tests, benchmarks)."""
        self._store.build_int8(self._slots)

    def _scores(self, embeddings: np.ndarray, start: int = 0) -> np.ndarray:
        """Float32 scores against slots [start:] this version sees; masked-out rows -inf."""
        scores = embeddings @ self._store.unit[start : self._slots].T
        if self._dead_rows:
            scores[:, self._dead[start:]] = -np.inf
        return scores

    def _top_k_int8(
        self,
        scan: Int8Scan,
        embeddings: np.ndarray,
        k: int,
        inverse_temperature: float | None = None,
    ) -> tuple[list[list[Prediction]], np.ndarray | None]:
        """Top-k from the int8 copy's candidates; with ``inverse_temperature``, also the log
        partition: the candidates' and the appended rows' float32 scores, the copy's
        approximate ones for every other live row (summed by the scan itself)."""
        beta = inverse_temperature
        if beta is None:
            values, indices, bounds = scan.candidates(embeddings, INT8_CANDIDATES)
            rest = None
        else:
            values, indices, bounds, rest = scan.candidates_and_rest(
                embeddings, INT8_CANDIDATES, beta, self._int8_live_mask(scan.rows)
            )
        appended = self._scores(embeddings, scan.rows)  # rows added after the copy: all exact
        unit, appended_slots, results = self._store.unit, np.arange(scan.rows, self._slots), []
        log_partition = np.empty(len(embeddings), dtype=np.float64) if beta is not None else None
        for i, query in enumerate(embeddings):
            candidates = indices[i]
            candidate_scores = unit[candidates] @ query
            candidate_scores[self._dead[candidates]] = -np.inf
            scores = np.concatenate([candidate_scores, appended[i]])
            if beta is not None and log_partition is not None and rest is not None:
                log_partition[i] = _int8_log_partition(scores, beta, float(rest[i]), float(bounds[i]))
            slots = np.concatenate([candidates, appended_slots])
            # Every row the int8 scan left out scores at most its k-th value plus the bound; strictly
            # below the k-th best exact score found, none of them can enter (or tie).
            if np.isfinite(scores).sum() >= k:
                best = self._best(scores, k, query, slots)
                if len(candidates) >= scan.rows or values[i, -1] + bounds[i] < best[-1].score:
                    results.append(best)
                    self._store.stats.add("int8")
                    continue
            self._store.stats.add("float32_fallback")
            results.append(self._best(self._scores(query[None, :])[0], k, query))
        if beta is not None and log_partition is not None:
            unsure = np.flatnonzero(np.isnan(log_partition))
            if len(unsure):  # the approximation's worst case too wide: the float32 pass decides
                log_partition[unsure] = self.log_partition(embeddings[unsure], beta)
        return results, log_partition

    def _int8_live_mask(self, rows: int) -> np.ndarray:
        """float32 [rows]: 0 where this version's row is live, -inf where masked out; the int8
        copy's log-sum-exp adds it. Kept per version (its mask never changes) for one copy size."""
        cached = self.__dict__.get("_live_mask_cache")
        if cached is None or cached[0] != rows:
            mask = np.where(self._dead[:rows], np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
            cached = (rows, mask)
            self.__dict__["_live_mask_cache"] = cached
        return cached[1]

    def _best(
        self, scores: np.ndarray, k: int, query: np.ndarray, slots: np.ndarray | None = None
    ) -> list[Prediction]:
        """The ``k`` best classes for ``query`` by exact score, then label, given its BLAS
        ``scores`` against store ``slots`` (default: slot i is scores[i]); at least ``k`` of them
        are finite (masked-out rows are -inf and stay out)."""
        if k <= 0:
            return []
        # argpartition finds the k-th best BLAS score in O(C). Any row of the exact top k scores
        # at least that minus twice the BLAS error bound in BLAS, so re-scoring exactly every row
        # above that line finds the exact top k, ties at the k-th place included.
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        line = kth - 2 * blas_error_bound(self.dim, float(np.linalg.norm(query)))
        candidates = np.flatnonzero(scores >= line)
        candidate_slots = candidates if slots is None else np.asarray(slots)[candidates]
        exact = exact_scores(self._store.unit[candidate_slots], query)
        labels = self._store.labels
        order = sorted(range(len(candidates)), key=lambda i: (-exact[i], labels[candidate_slots[i]]))[:k]
        return [Prediction(labels[candidate_slots[i]], float(exact[i])) for i in order]
