"""Nearest-prototype classification: cosine similarity, top-k, deterministic ties.

``score`` is the cosine similarity in [-1, 1] between the image's L2-normalised embedding and the
re-normalised class prototype (the mean of the class's normalised example embeddings). It is not
a calibrated probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    # P(this label is right), from the score's margin over the best other class (open_set.py).
    confidence: float | None = None


class PrototypeMatrix:
    """Class prototypes prepared once for many queries: rows re-normalised, sorted by label.

    ``prototypes`` keeps the rows as given (class means), ``matrix`` the re-normalised ones.

    Sorting the rows by label makes "score desc, then label asc" the same as "score desc, then
    row index asc", so ties never depend on the order Redis returned the classes in.
    """

    def __init__(self, labels: Sequence[str], matrix: np.ndarray) -> None:
        if len(labels) != len(matrix) or matrix.ndim != 2:
            raise ValueError(f"{len(labels)} labels for a prototype matrix of shape {matrix.shape}")
        order = sorted(range(len(labels)), key=lambda row: labels[row])
        self.labels: list[str] = [labels[row] for row in order]
        # Shared by every request of a replica (the registry caches this object): read-only.
        self.prototypes = np.asarray(matrix, dtype=np.float32)[order]
        norms = np.linalg.norm(self.prototypes, axis=1, keepdims=True)
        self.matrix = np.ascontiguousarray(self.prototypes / np.maximum(norms, 1e-12), dtype=np.float32)
        self.prototypes.setflags(write=False)
        self.matrix.setflags(write=False)

    def __len__(self) -> int:
        return len(self.labels)

    def top_k(self, embeddings: np.ndarray, k: int) -> list[list[Prediction]]:
        """For each row of ``embeddings`` ``[N, D]`` (unit norm): the ``k`` best classes."""
        if embeddings.shape[1] != self.matrix.shape[1]:
            raise ValueError(
                f"embedding size {embeddings.shape[1]} does not match prototypes of size "
                f"{self.matrix.shape[1]}"
            )
        scores = embeddings.astype(np.float32, copy=False) @ self.matrix.T  # [N, C]
        k = min(k, len(self.labels))
        return [self._best(row, k) for row in scores]

    def _best(self, scores: np.ndarray, k: int) -> list[Prediction]:
        if k <= 0:
            return []
        # argpartition finds the k-th best score in O(C); everything tied with it is kept so
        # the stable sort below, not argpartition's arbitrary choice, decides ties.
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        candidates = np.flatnonzero(scores >= kth)
        ranked = candidates[np.argsort(-scores[candidates], kind="stable")][:k]
        return [Prediction(self.labels[i], float(scores[i])) for i in ranked]
