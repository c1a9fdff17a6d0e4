""" "None of these": the unknown flag and the confidence of a classification, calibrated per namespace.

Both come from the namespace's own examples, scored leave-one-out (LOO): example ``e`` of class
``c`` is scored against the prototype of ``c`` without it, ``(sum_c - e) / (n_c - 1)``, and against
the other classes' full prototypes -- what a new image of ``c`` would see. So

- ``unknown``: an image is flagged when its unknown statistic (see :data:`UNKNOWN_STATISTIC`) is
  below the ``unknown_rate`` quantile of the examples' LOO statistics, i.e. about ``unknown_rate``
  of the images of registered classes are flagged;
- ``confidence``: one probability distribution over the namespace's classes *and* "unknown": a
  softmax of ``score / T`` over every class plus an "unknown" logit ``threshold / T`` (the threshold
  above, so an image is flagged unknown exactly when "unknown" is the distribution's most likely
  answer). The temperature ``T`` is fitted per namespace on the LOO scores (the own score as a new
  image would see it, :func:`fresh_own_scores`) by minimising the log loss of "the top-1 is right"
  under the top-1's probability (:func:`fit_inverse_temperature`): one parameter, sane with 3
  classes x 5 shots. The confidences of the top-k and P(unknown) therefore sum to at most 1
  (exactly 1 over every class and unknown).

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
# 1 / temperature of the softmax for namespaces too small to fit their own (dev split, shipped
# model, 50 classes x 5 shots, fitted as below: bench/bench_calibration.py).
DEFAULT_INVERSE_TEMPERATURE = 8.5
# The fitted 1/T stays in this range (cosines span [-1, 1]: 1/T = 1 is nearly uniform, 400 a hard max).
INVERSE_TEMPERATURE_RANGE = (1.0, 400.0)
# Weight (in examples) of a prior pulling log(1/T) towards the default: a handful of perfectly
# separated examples would otherwise fit T -> 0 and answer every image with certainty.
TEMPERATURE_PRIOR_EXAMPLES = 2.0
# Rows used to fit T: plenty for one parameter, and the fit stays small beside the LOO scores.
MAX_TEMPERATURE_FIT_ROWS = 512
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
    # [M] each example's LOO score as a new image would see its class (see fresh_own_scores).
    fresh_own: np.ndarray | None = None

    @property
    def fresh_scores(self) -> np.ndarray:
        """``scores`` with each own column replaced by ``fresh_own``: what the temperature is fitted on."""
        if self.fresh_own is None:
            return self.scores
        scores = self.scores.copy()
        scores[np.arange(len(self.own)), self.own] = self.fresh_own
        return scores

    @property
    def own_scores(self) -> np.ndarray:
        return self.scores[np.arange(len(self.own)), self.own]

    @property
    def correct(self) -> np.ndarray:
        """Whether the example's own class is its LOO top-1 (ties count as right)."""
        return self.own_scores >= self.scores.max(axis=1)


def fresh_own_scores(mean: np.ndarray, count: int, vectors: np.ndarray) -> np.ndarray:
    """Each of ``vectors``' (unit rows of a class of ``count`` examples with mean ``mean``) score
    against its class without it, as a *new* image scores against the whole class: the LOO
    mean's dot product over the norm of the full mean. The plain LOO cosine divides by the norm
    of a mean of one example fewer, which is larger on average (more noise left in it), so a
    temperature fitted on it came out too high for new images, whose prototype has every shot."""
    loo_mean = (mean.astype(np.float64) * count - vectors) / (count - 1)
    return np.sum(vectors * loo_mean, axis=1) / max(float(np.linalg.norm(mean)), 1e-12)


def leave_one_out_scores(means: np.ndarray, counts: np.ndarray, examples: list[np.ndarray]) -> LooScores:
    """``means`` [C, D]: class means of unit vectors over all ``counts`` [C] examples;
    ``examples[c]`` [n, D]: (some of) class c's unit embeddings. Classes of one example add none."""
    prototypes = l2_normalize(means.astype(np.float64))
    rows, own, fresh = [], [], []
    for c, vectors in enumerate(examples):
        if counts[c] < 2 or len(vectors) == 0:
            continue
        vectors = vectors.astype(np.float64)
        scores = vectors @ prototypes.T
        without_self = l2_normalize(means[c] * counts[c] - vectors)  # / (n - 1): direction only
        scores[:, c] = np.sum(vectors * without_self, axis=1)
        rows.append(scores)
        fresh.append(fresh_own_scores(means[c], int(counts[c]), vectors))
        own += [c] * len(vectors)
    if not rows:
        return LooScores(np.zeros((0, len(means))), np.zeros(0, dtype=np.int64), np.zeros(0))
    return LooScores(np.concatenate(rows), np.asarray(own, dtype=np.int64), np.concatenate(fresh))


def log_sum_exp(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(values))) along ``axis``, without overflow; rows of -inf give -inf."""
    peak = np.max(values, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(values - peak), axis=axis))


def softmax_nll(scores: np.ndarray, own: np.ndarray, threshold: float, inverse_temperature: float) -> float:
    """Mean negative log-likelihood of each row's ``own`` column under the softmax of
    ``scores * 1/T`` over the columns plus an unknown logit ``threshold * 1/T``."""
    logits = scores * inverse_temperature
    log_partition = np.logaddexp(log_sum_exp(logits), threshold * inverse_temperature)
    return float(np.mean(log_partition - logits[np.arange(len(own)), own]))


def top1_log_loss(scores: np.ndarray, own: np.ndarray, threshold: float, inverse_temperature: float) -> float:
    """Mean negative log-likelihood of "the top-1 is right" under the top-1's softmax
    probability (the number Classify calls its confidence): what :func:`fit_inverse_temperature`
    minimises."""
    logits = scores * inverse_temperature
    log_partition = np.logaddexp(log_sum_exp(logits), threshold * inverse_temperature)
    top1 = np.clip(np.exp(logits.max(axis=1) - log_partition), 1e-12, 1.0 - 1e-12)
    right = scores[np.arange(len(own)), own] >= scores.max(axis=1)
    return float(-np.mean(np.where(right, np.log(top1), np.log1p(-top1))))


def fit_inverse_temperature(
    scores: np.ndarray,
    own: np.ndarray,
    threshold: float,
    prior: float = DEFAULT_INVERSE_TEMPERATURE,
    prior_examples: float = TEMPERATURE_PRIOR_EXAMPLES,
) -> float:
    """The 1/T minimising :func:`top1_log_loss` over the rows, plus a weak prior on log(1/T)
    towards ``prior``: a grid over :data:`INVERSE_TEMPERATURE_RANGE` (log-spaced), refined by a
    golden-section search around its best point. ``scores`` [M, K] may hold only some columns
    per row (the best few: a large namespace's sample); ``own`` [M]: each row's own column.

    Why the top-1's log loss and not the NLL of the own class over the whole distribution: one
    temperature cannot fit both, and the full NLL's optimum left the top-1 (what a person reads)
    underconfident on the dev split; docs/open-set.md has the figures."""
    weight = prior_examples / len(scores)  # against every row, though the fit reads a spread of them
    if len(scores) > MAX_TEMPERATURE_FIT_ROWS:
        keep = np.linspace(0, len(scores) - 1, MAX_TEMPERATURE_FIT_ROWS).astype(np.int64)
        scores, own = scores[keep], own[keep]
    scores = scores.astype(np.float64)

    def objective(log_beta: float) -> float:
        beta = float(np.exp(log_beta))
        return top1_log_loss(scores, own, threshold, beta) + weight * (log_beta - np.log(prior)) ** 2

    grid = np.linspace(np.log(INVERSE_TEMPERATURE_RANGE[0]), np.log(INVERSE_TEMPERATURE_RANGE[1]), 16)
    best = int(np.argmin([objective(g) for g in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = high - golden * (high - low), low + golden * (high - low)
    fa, fb = objective(a), objective(b)
    for _ in range(14):  # the bracket (two grid steps, ~0.8 in log) shrinks to 0.618^14 of it: < 0.1%
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - golden * (high - low)
            fa = objective(a)
        else:
            low, a, fa = a, b, fb
            b = low + golden * (high - low)
            fb = objective(b)
    return float(np.exp((low + high) / 2.0))


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) of an ascending array, without np.quantile's argument
    handling and partitioning of a copy (the array is sorted already): it runs on every Classify."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low))


@dataclass(frozen=True)
class Calibration:
    """A namespace's unknown thresholds and softmax temperature, for one state of it."""

    sorted_statistics: np.ndarray  # LOO unknown statistics of the examples, ascending
    inverse_temperature: float = DEFAULT_INVERSE_TEMPERATURE  # 1/T of the softmax over scores
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

    def unknown_logit(self, unknown_rate: float) -> float:
        """The score "unknown" competes with in the softmax: the threshold on the top-1 score (the
        default statistic), so the flag and the distribution agree (flagged <=> unknown is the
        likeliest answer); for the margin statistic, the dev split's threshold on the score."""
        return self.threshold(unknown_rate) if self.kind == "score" else DEFAULT_THRESHOLD

    def distribution(
        self, scores: np.ndarray, log_partition: np.ndarray, unknown_rate: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """``scores`` [N, k] (some classes of each image), ``log_partition`` [N]: log sum over
        *every* class of exp(score/T) -> (P(class) [N, k], P(unknown) [N]), one distribution."""
        beta = self.inverse_temperature
        unknown = self.unknown_logit(unknown_rate) * beta
        total = np.logaddexp(log_partition, unknown)
        return np.exp(scores * beta - total[:, None]), np.exp(unknown - total)


def calibrate(loo: LooScores, kind: UnknownStatistic = UNKNOWN_STATISTIC) -> Calibration:
    top1, _ = top_two(loo.scores)
    return calibrate_rows(top1, loo.scores, loo.own, kind, loo.fresh_scores)


def calibrate_rows(
    top1: np.ndarray,
    scores: np.ndarray,
    own: np.ndarray,
    kind: UnknownStatistic = UNKNOWN_STATISTIC,
    fit_scores: np.ndarray | None = None,
) -> Calibration:
    """From each calibration example's LOO best score ``top1``, its LOO scores against (some of)
    the classes ``scores`` [M, K] and the column of its own class ``own`` [M]; the temperature
    from ``fit_scores`` (the same with fresh own scores, :func:`fresh_own_scores`) if given."""
    if len(top1) < MIN_CALIBRATION_EXAMPLES:
        return Calibration(np.zeros(0), DEFAULT_INVERSE_TEMPERATURE, kind)
    if kind == "score":
        statistics = np.sort(top1)
    else:
        second = -np.partition(-scores, 1, axis=1)[:, 1] if scores.shape[1] > 1 else NO_SECOND_SCORE
        statistics = np.sort(unknown_statistic(top1, second, kind))
    unfitted = Calibration(statistics, DEFAULT_INVERSE_TEMPERATURE, kind)
    fit_on = scores if fit_scores is None else fit_scores
    beta = fit_inverse_temperature(fit_on, own, unfitted.unknown_logit(DEFAULT_UNKNOWN_RATE))
    return dataclasses.replace(unfitted, inverse_temperature=beta)


def calibrate_snapshot(snapshot: ExampleSnapshot, kind: UnknownStatistic = UNKNOWN_STATISTIC) -> Calibration:
    return calibrate(leave_one_out_scores(snapshot.means, snapshot.counts, snapshot.embeddings), kind)


# Classes per example a large namespace's sampled calibration scores (its own LOO and the best
# others): the softmax's partition is dominated by them at the temperatures fitted.
SAMPLED_SCORES_PER_EXAMPLE = 8


def loo_rows_against(
    classifier: PrototypeMatrix, sample: ExampleSnapshot, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LOO best score, and LOO scores against the best few classes (own class in column 0), of
    ``sample``'s examples against every class of ``classifier``, without an [examples x classes]
    matrix: one top-k scan per example, its own class replaced by its LOO score. ``sample``
    holds some classes only (their means and counts as of one state; the classifier may be a
    moment newer). Returns (top1 [M], scores [M, K], own column [M] = 0, scores with the own
    column as a new image would see it [M, K])."""
    own_scores, rows, own_labels, fresh = [], [], [], []
    for c, vectors in enumerate(sample.embeddings):
        if sample.counts[c] < 2 or len(vectors) == 0:
            continue
        without_self = l2_normalize(sample.means[c] * sample.counts[c] - vectors)  # / (n - 1)
        own_scores.append(np.sum(vectors * without_self, axis=1))
        fresh.append(fresh_own_scores(sample.means[c], int(sample.counts[c]), vectors))
        rows.append(vectors)
        own_labels += [sample.labels[c]] * len(vectors)
    width = SAMPLED_SCORES_PER_EXAMPLE
    if not rows:
        empty = np.zeros((0, width))
        return np.zeros(0), empty, np.zeros(0, dtype=np.int64), empty
    examples, own = np.concatenate(rows).astype(np.float32), np.concatenate(own_scores)
    scores = np.full((len(own), width), NO_SECOND_SCORE, dtype=np.float64)
    scores[:, 0] = own
    for start in range(0, len(examples), chunk):
        ranked = classifier.top_k(examples[start : start + chunk], width)
        for i, preds in enumerate(ranked, start):
            others = [p.score for p in preds if p.label != own_labels[i]][: width - 1]
            scores[i, 1 : 1 + len(others)] = others
    fresh_scores = scores.copy()
    fresh_scores[:, 0] = np.concatenate(fresh)
    return scores.max(axis=1), scores, np.zeros(len(own), dtype=np.int64), fresh_scores


def sampled_labels(labels: list[str], count: int) -> list[str]:
    """``count`` of ``labels`` chosen by a hash of each label: the same sample on every replica
    and every state, so successive calibrations of a growing namespace stay comparable."""
    if len(labels) <= count:
        return labels
    ranked = sorted(labels, key=lambda label: hashlib.blake2b(label.encode(), digest_size=8).digest())
    return sorted(ranked[:count])


@dataclass(frozen=True)
class OpenSetResult:
    """One image's answer: its best classes (with confidences), whether it matches none, and the
    probability of "unknown" in the same distribution as the confidences."""

    predictions: list[Prediction]
    unknown: bool
    unknown_probability: float = 0.0


def label_images(
    classifier: PrototypeMatrix,
    calibration: Calibration,
    embeddings: np.ndarray,
    top_k: int,
    unknown_rate: float,
) -> list[OpenSetResult]:
    """Top-k predictions of each image, each with its confidence, and the unknown flag.

    A prediction's confidence is its class's probability in the softmax over every class and
    "unknown" (:meth:`Calibration.distribution`): the partition reads every class's score."""
    # One scan of the prototypes: the best two scores come with the top-k (at least 2).
    beta = calibration.inverse_temperature
    ranked, approximate = classifier.top_k_and_log_partition(embeddings, max(top_k, 2), beta)
    top1 = np.array([preds[0].score for preds in ranked], dtype=np.float32)
    top2 = np.array(
        [preds[1].score if len(preds) > 1 else NO_SECOND_SCORE for preds in ranked], dtype=np.float32
    )
    unknown = calibration.unknown(top1, top2, unknown_rate)
    # The partition's BLAS scores may round a hair off the exact ones the predictions carry: it is
    # never taken below the exact ranked classes' own sum, so the top-k never sum past 1; where
    # they are every class, it is their sum, so all of them and unknown sum to 1.
    ranked_scores = np.array([[p.score for p in preds] for preds in ranked], dtype=np.float64)
    exact = log_sum_exp(ranked_scores.reshape(len(ranked), -1) * beta)
    if ranked_scores.size and ranked_scores.shape[1] == len(classifier):
        log_partition = exact
    else:
        log_partition = np.maximum(approximate, exact)
    width = min(top_k, len(classifier))
    scores = np.array([[p.score for p in preds[:width]] for preds in ranked], dtype=np.float64)
    confidences, unknown_probability = calibration.distribution(
        scores.reshape(len(ranked), width), log_partition, unknown_rate
    )
    return [
        OpenSetResult(
            [dataclasses.replace(p, confidence=float(c)) for p, c in zip(preds[:width], row)],
            bool(flagged),
            float(p_unknown),
        )
        for preds, row, flagged, p_unknown in zip(ranked, confidences, unknown, unknown_probability)
    ]
