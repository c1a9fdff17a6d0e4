""""None of these": the unknown flag and the confidence of a classification, calibrated per namespace.

Both come from the namespace's own examples, scored leave-one-out (LOO): example ``e`` of class
``c`` is scored against the prototype of ``c`` without it, ``(sum_c - e) / (n_c - 1)``, and against
the other classes' full prototypes -- what a new image of ``c`` would see. So

- ``unknown``: an image is flagged when its unknown statistic (see :data:`UNKNOWN_STATISTIC`) is
  below the ``unknown_rate`` quantile of the examples' LOO statistics, i.e. about ``unknown_rate``
  of the images of registered classes are flagged;
- ``confidence``: a logistic curve over the top-1 margin (top-1 minus top-2 score), fitted to
  whether each example's LOO top-1 class was its own: an estimate of P(top-1 label is right),
  for an image of one of the registered classes.

Classes with one example have no LOO score; a namespace with fewer than
:data:`MIN_CALIBRATION_EXAMPLES` LOO scores uses the global defaults below (measured on the
Tiny ImageNet dev split with the shipped model, ``bench/bench_open_set.py``).

The calibration of a namespace is computed once per state (epoch, generation) from one fetch of its
examples (at most :data:`MAX_EXAMPLES_PER_CLASS` per class) and cached here.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fewshot_common.errors import InvalidInput
from fewshot_common.vectors import l2_normalize

from .classifier import Prediction, PrototypeMatrix

if TYPE_CHECKING:
    from .registry import ExampleSnapshot, PrototypeSet, Registry

DEFAULT_UNKNOWN_RATE = 0.05
# Examples per class used to calibrate (the calibration cost per namespace change is bounded).
MAX_EXAMPLES_PER_CLASS = 64
MIN_CALIBRATION_EXAMPLES = 10
# "score": the top-1 cosine; "margin": top-1 minus top-2. Chosen by bench/bench_open_set.py.
UnknownStatistic = Literal["score", "margin"]
UNKNOWN_STATISTIC: UnknownStatistic = "score"
# Fallbacks for namespaces too small to calibrate (dev split, shipped int8 model, 5 shots).
DEFAULT_THRESHOLD = 0.29  # on the unknown statistic: the dev split's 5% LOO quantile
DEFAULT_CONFIDENCE = (5.7, -2.1)  # logistic (slope, intercept) over the margin, dev split
# When a class has no second class to compare with, the "second" score is this (cosines >= -1).
NO_SECOND_SCORE = -1.0


def resolve_unknown_rate(rate: float | None, default: float = DEFAULT_UNKNOWN_RATE) -> float:
    """0 (or unset) means the server default; otherwise strictly between 0 and 1."""
    if not rate:
        return default
    if not 0.0 < rate < 1.0 or not np.isfinite(rate):
        raise InvalidInput(f"unknown_rate must be between 0 and 1 (exclusive), got {rate}")
    return float(rate)


def top_two(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` [N, C]: the best and second-best score (second: NO_SECOND_SCORE if C=1)."""
    if scores.shape[1] == 1:
        return scores[:, 0], np.full(len(scores), NO_SECOND_SCORE, dtype=scores.dtype)
    best_two = -np.partition(-scores, 1, axis=1)[:, :2]
    return best_two[:, 0], best_two[:, 1]


def unknown_statistic(top1: np.ndarray, top2: np.ndarray, kind: UnknownStatistic) -> np.ndarray:
    """Higher means more like a registered class."""
    return top1 if kind == "score" else top1 - top2


@dataclass(frozen=True)
class LooScores:
    """Each calibration example scored against every class; its own class leave-one-out."""

    scores: np.ndarray  # [M, C] cosine; column own[i] is the LOO score
    own: np.ndarray  # [M] class index of each example

    @property
    def own_scores(self) -> np.ndarray:
        return self.scores[np.arange(len(self.own)), self.own]

    @property
    def correct(self) -> np.ndarray:
        """Whether the example's own class is its LOO top-1 (ties count as right)."""
        return self.own_scores >= self.scores.max(axis=1)


def leave_one_out_scores(
    means: np.ndarray, counts: np.ndarray, examples: list[np.ndarray]
) -> LooScores:
    """``means`` [C, D]: class means of unit vectors over all ``counts`` [C] examples;
    ``examples[c]`` [n, D]: (some of) class c's unit embeddings. Classes of one example add none."""
    prototypes = l2_normalize(means.astype(np.float64))
    rows, own = [], []
    for c, vectors in enumerate(examples):
        if counts[c] < 2 or len(vectors) == 0:
            continue
        vectors = vectors.astype(np.float64)
        scores = vectors @ prototypes.T
        without_self = l2_normalize(means[c] * counts[c] - vectors)  # / (n - 1): direction only
        scores[:, c] = np.sum(vectors * without_self, axis=1)
        rows.append(scores)
        own += [c] * len(vectors)
    if not rows:
        return LooScores(np.zeros((0, len(means))), np.zeros(0, dtype=np.int64))
    return LooScores(np.concatenate(rows), np.asarray(own, dtype=np.int64))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> tuple[float, float]:
    """P(y | x) = sigmoid(a x + b) by Newton's method; the small L2 term keeps a separable set
    (every example right) finite. Returns (a, b)."""
    features = np.stack([x, np.ones_like(x)], axis=1)
    weights = np.zeros(2)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-features @ weights))
        gradient = features.T @ (p - y) + l2 * weights
        hessian = (features.T * (p * (1 - p))) @ features + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(weights[0]), float(weights[1])


@dataclass(frozen=True)
class Calibration:
    """A namespace's unknown thresholds and confidence curve, for one state of it."""

    sorted_statistics: np.ndarray  # LOO unknown statistics of the examples, ascending
    confidence_curve: tuple[float, float]  # (slope, intercept) over the margin
    kind: UnknownStatistic = UNKNOWN_STATISTIC

    @property
    def calibrated(self) -> bool:
        return len(self.sorted_statistics) >= MIN_CALIBRATION_EXAMPLES

    def threshold(self, unknown_rate: float) -> float:
        if not self.calibrated:
            return DEFAULT_THRESHOLD
        return float(np.quantile(self.sorted_statistics, unknown_rate))

    def unknown(self, top1: np.ndarray, top2: np.ndarray, unknown_rate: float) -> np.ndarray:
        return unknown_statistic(top1, top2, self.kind) < self.threshold(unknown_rate)

    def confidence(self, top1: np.ndarray, top2: np.ndarray) -> np.ndarray:
        slope, intercept = self.confidence_curve
        return 1.0 / (1.0 + np.exp(-(slope * (top1 - top2) + intercept)))


def calibrate(loo: LooScores, kind: UnknownStatistic = UNKNOWN_STATISTIC) -> Calibration:
    if len(loo.own) < MIN_CALIBRATION_EXAMPLES:
        return Calibration(np.zeros(0), DEFAULT_CONFIDENCE, kind)
    top1, top2 = top_two(loo.scores)
    statistics = np.sort(unknown_statistic(top1, top2, kind))
    curve = fit_logistic(top1 - top2, loo.correct.astype(np.float64))
    if curve[0] <= 0:
        # A few noisy examples can fit a curve on which a larger margin means *less* confidence
        # (seen with 3 classes x 5 shots): confidence must rise with the margin, so such a
        # namespace keeps the dev-split curve until its own examples say something sensible.
        curve = DEFAULT_CONFIDENCE
    return Calibration(statistics, curve, kind)


def calibrate_snapshot(snapshot: "ExampleSnapshot", kind: UnknownStatistic = UNKNOWN_STATISTIC) -> Calibration:
    return calibrate(leave_one_out_scores(snapshot.means, snapshot.counts, snapshot.embeddings), kind)


class OpenSetCalibrator:
    """One :class:`Calibration` per namespace, rebuilt when the namespace's state changes."""

    def __init__(self, registry: "Registry", max_examples_per_class: int = MAX_EXAMPLES_PER_CLASS) -> None:
        self._registry = registry
        self._max_examples_per_class = max_examples_per_class
        self._cache: dict[tuple[str, str | None], tuple[tuple[str, int], Calibration]] = {}
        self._lock = threading.Lock()

    def calibration(self, namespace: str, prototypes: "PrototypeSet") -> Calibration:
        """The calibration for ``prototypes``' state of ``namespace`` (or a newer one)."""
        key = (namespace, prototypes.model_id)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] == (prototypes.epoch, prototypes.generation):
            return cached[1]
        # Fetched and computed outside the lock; two racing requests both compute, one wins.
        snapshot = self._registry.example_snapshot(
            namespace, self._max_examples_per_class, model_id=prototypes.model_id
        )
        calibration = calibrate_snapshot(snapshot)
        with self._lock:
            self._cache[key] = ((snapshot.epoch, snapshot.generation), calibration)
        return calibration


@dataclass(frozen=True)
class OpenSetResult:
    """One image's answer: its best classes (with confidences), and whether it matches none."""

    predictions: list[Prediction]
    unknown: bool


def label_images(
    classifier: PrototypeMatrix,
    calibration: Calibration,
    embeddings: np.ndarray,
    top_k: int,
    unknown_rate: float,
) -> list[OpenSetResult]:
    """Top-k predictions of each image, each with its confidence, and the unknown flag.

    A prediction's confidence is the curve at its score minus the best *other* class's score
    (the margin to the runner-up for the top-1; negative below it)."""
    predictions = classifier.top_k(embeddings, top_k)
    top1, top2 = top_two(embeddings.astype(np.float32, copy=False) @ classifier.matrix.T)
    unknown = calibration.unknown(top1, top2, unknown_rate)
    results = []
    for preds, best, second, flagged in zip(predictions, top1, top2, unknown):
        scores = np.array([p.score for p in preds])
        rival = np.where(scores >= best, second, best)
        confidence = calibration.confidence(scores, rival) if len(preds) else []
        results.append(OpenSetResult(
            [dataclasses.replace(p, confidence=float(c)) for p, c in zip(preds, confidence)],
            bool(flagged),
        ))  # fmt: skip
    return results
