"""What the registry hands the classification code: a namespace's prototypes at one state
(:class:`PrototypeSet`) and its example embeddings (:class:`ExampleSnapshot`). Plain values, here
so the math in this package needs nothing from the registry that builds them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prototypes import PrototypeMatrix


@dataclass(frozen=True)
class PrototypeSet:
    """One state of a namespace's prototypes under one model, ready to classify with; never
    changed once built. The registry builds one per (epoch, generation) and hands the same object
    to every request until the namespace changes, so rows are re-normalised once per change."""

    classifier: PrototypeMatrix  # re-normalised rows; patched copy-on-write per change
    model_id: str | None
    generation: int
    epoch: str = ""  # with generation, identifies this state of the namespace

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    @property
    def matrix(self) -> np.ndarray:
        """[C, D] float32 in ``labels`` order: means of unit vectors (not re-normalised)."""
        return self.classifier.prototypes


@dataclass(frozen=True)
class ExampleSnapshot:
    """A namespace's classes under one model at one state: every prototype, and the example
    embeddings of the classes asked for (the others hold none here). Lists are in ``labels``
    order (sorted)."""

    labels: list[str]
    means: np.ndarray  # [C, D] float32: each class's mean of unit embeddings (its prototype row)
    counts: np.ndarray  # [C] embedded examples per class (also where fewer were fetched)
    example_ids: list[list[str]]  # fetched ids per class, in id order
    embeddings: list[np.ndarray]  # [n_c, D] unit float32 rows, matching example_ids
    epoch: str
    generation: int
