""" "None of these": the unknown flag and the confidence of a classification, calibrated per namespace.

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
examples (at most ``MAX_EXAMPLES_PER_CLASS`` per class) and cached by the core's
:mod:`calibrator <fewshot_service.core.calibrator>` (which owns the numbers named below). Its cost is examples x
classes, so beyond :data:`SYNC_CALIBRATION_CLASSES` classes it is bounded and kept off the request
path: a sample of :data:`SAMPLED_CLASSES` classes (:data:`SAMPLED_EXAMPLES_PER_CLASS` examples each)
is scored against every class in a background thread, at most once per
:data:`REFRESH_INTERVAL_S` per namespace (and at most :data:`BUSY_FRACTION` of a core), while requests use the newest calibration finished (the
global defaults until the first one is). One added example barely moves a quantile over a thousand
LOO scores, whereas recomputing it on the request path made the first Classify after an add to a
large namespace cost dozens of Embeds (docs/benchmarks/registry-scale.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fewshot_common.errors import InvalidInput
from fewshot_common.vectors import l2_normalize

from .prototypes import Prediction, PrototypeMatrix

if TYPE_CHECKING:
    from .snapshot import ExampleSnapshot

DEFAULT_UNKNOWN_RATE = 0.05
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


def leave_one_out_scores(means: np.ndarray, counts: np.ndarray, examples: list[np.ndarray]) -> LooScores:
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


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) of an ascending array, without np.quantile's argument
    handling and partitioning of a copy (the array is sorted already): it runs on every Classify."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low))


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
        return _quantile(self.sorted_statistics, unknown_rate)

    def unknown(self, top1: np.ndarray, top2: np.ndarray, unknown_rate: float) -> np.ndarray:
        return unknown_statistic(top1, top2, self.kind) < self.threshold(unknown_rate)

    def confidence(self, top1: np.ndarray, top2: np.ndarray) -> np.ndarray:
        slope, intercept = self.confidence_curve
        return 1.0 / (1.0 + np.exp(-(slope * (top1 - top2) + intercept)))


def calibrate(loo: LooScores, kind: UnknownStatistic = UNKNOWN_STATISTIC) -> Calibration:
    top1, top2 = top_two(loo.scores)
    return calibrate_top_two(top1, top2, loo.correct, kind)


def calibrate_top_two(
    top1: np.ndarray, top2: np.ndarray, correct: np.ndarray, kind: UnknownStatistic = UNKNOWN_STATISTIC
) -> Calibration:
    """From each calibration example's LOO best and second-best score, and whether its own class
    was the best."""
    if len(top1) < MIN_CALIBRATION_EXAMPLES:
        return Calibration(np.zeros(0), DEFAULT_CONFIDENCE, kind)
    statistics = np.sort(unknown_statistic(top1, top2, kind))
    curve = fit_logistic(top1 - top2, correct.astype(np.float64))
    if curve[0] <= 0:
        # A few noisy examples can fit a curve on which a larger margin means *less* confidence
        # (seen with 3 classes x 5 shots): confidence must rise with the margin, so such a
        # namespace keeps the dev-split curve until its own examples say something sensible.
        curve = DEFAULT_CONFIDENCE
    return Calibration(statistics, curve, kind)


def calibrate_snapshot(snapshot: ExampleSnapshot, kind: UnknownStatistic = UNKNOWN_STATISTIC) -> Calibration:
    return calibrate(leave_one_out_scores(snapshot.means, snapshot.counts, snapshot.embeddings), kind)


def loo_top_two_against(
    classifier: PrototypeMatrix, sample: ExampleSnapshot, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LOO best and second-best scores (and whether the own class won) of ``sample``'s examples
    against every class of ``classifier``, without an [examples x classes] matrix: each example's
    top-3 from one top-k scan, its own class replaced by its LOO score. ``sample`` holds some
    classes only (their means and counts as of one state; the classifier may be a moment newer)."""
    own_scores, rows, own_labels = [], [], []
    for c, vectors in enumerate(sample.embeddings):
        if sample.counts[c] < 2 or len(vectors) == 0:
            continue
        without_self = l2_normalize(sample.means[c] * sample.counts[c] - vectors)  # / (n - 1)
        own_scores.append(np.sum(vectors * without_self, axis=1))
        rows.append(vectors)
        own_labels += [sample.labels[c]] * len(vectors)
    if not rows:
        empty = np.zeros(0, dtype=np.float32)
        return empty, empty, np.zeros(0, dtype=bool)
    examples, own = np.concatenate(rows).astype(np.float32), np.concatenate(own_scores)
    top1, top2, correct = np.empty(len(own)), np.empty(len(own)), np.empty(len(own), dtype=bool)
    for start in range(0, len(examples), chunk):
        ranked = classifier.top_k(examples[start : start + chunk], 3)
        for i, preds in enumerate(ranked, start):
            others = [p.score for p in preds if p.label != own_labels[i]][:2]
            others += [NO_SECOND_SCORE] * (2 - len(others))
            best_two = sorted([own[i], *others], reverse=True)[:2]
            top1[i], top2[i], correct[i] = best_two[0], best_two[1], own[i] >= others[0]
    return top1, top2, correct


def sampled_labels(labels: list[str], count: int) -> list[str]:
    """``count`` of ``labels`` chosen by a hash of each label: the same sample on every replica
    and every state, so successive calibrations of a growing namespace stay comparable."""
    if len(labels) <= count:
        return labels
    ranked = sorted(labels, key=lambda label: hashlib.blake2b(label.encode(), digest_size=8).digest())
    return sorted(ranked[:count])


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
    # One scan of the prototypes: the best two scores come with the top-k (at least 2).
    ranked = classifier.top_k(embeddings, max(top_k, 2))
    top1 = np.array([preds[0].score for preds in ranked], dtype=np.float32)
    top2 = np.array(
        [preds[1].score if len(preds) > 1 else NO_SECOND_SCORE for preds in ranked], dtype=np.float32
    )
    unknown = calibration.unknown(top1, top2, unknown_rate)
    results = []
    for ranked_preds, best, second, flagged in zip(ranked, top1, top2, unknown):
        preds = ranked_preds[:top_k]
        scores = np.array([p.score for p in preds])
        rival = np.where(scores >= best, second, best)
        confidence = calibration.confidence(scores, rival) if len(preds) else []
        results.append(
            OpenSetResult(
                [dataclasses.replace(p, confidence=float(c)) for p, c in zip(preds, confidence)],
                bool(flagged),
            )
        )
    return results
