"""Classify's confidences are one distribution over the namespace's classes and "unknown" (issue 33):
the math of classify/open_set.py on its own, no server (test_open_set.py has the transports)."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_common.vectors import l2_normalize
from fewshot_service.classify.open_set import (
    DEFAULT_INVERSE_TEMPERATURE,
    DEFAULT_THRESHOLD,
    INVERSE_TEMPERATURE_RANGE,
    Calibration,
    calibrate,
    fresh_own_scores,
    label_images,
    leave_one_out_scores,
    log_sum_exp,
    softmax_nll,
    top1_log_loss,
)
from fewshot_service.classify.prototypes import PrototypeMatrix


def clusters(
    classes: int, per_class: int, noise: float, seed: int, dim: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random class centres (the larger ``noise``, the more they overlap)."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((classes, dim)))
    labels = np.repeat(np.arange(classes), per_class)
    vectors = centres[labels] + noise * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    return l2_normalize(vectors).astype(np.float32), labels


def namespace(vectors: np.ndarray, labels: np.ndarray, shots: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class means of the first ``shots`` vectors of each class, and those shots."""
    support = [vectors[labels == c][:shots] for c in np.unique(labels)]
    return np.stack([s.mean(axis=0) for s in support]).astype(np.float32), support


def test_the_top_k_and_unknown_sum_to_at_most_one_and_all_classes_to_exactly_one() -> None:
    vectors, labels = clusters(6, 8, 0.9, seed=1)
    means, support = namespace(vectors, labels, 5)
    calibration = calibrate(leave_one_out_scores(means, np.full(6, 5), support))
    matrix = PrototypeMatrix([f"c{i}" for i in range(6)], means)
    queries = vectors[labels >= 0]
    for top_k in (1, 3, 6):
        results = label_images(matrix, calibration, queries, top_k, 0.05)
        for result in results:
            total = sum(p.confidence for p in result.predictions) + result.unknown_probability
            assert total <= 1.0 + 1e-9
            if top_k == 6:
                assert total == pytest.approx(1.0, abs=1e-9)
            assert all(0.0 < p.confidence < 1.0 for p in result.predictions)
            # The confidences follow the scores' order.
            confidences = [p.confidence for p in result.predictions]
            assert confidences == sorted(confidences, reverse=True)


def test_confidence_rises_with_the_score_and_the_unknown_flag_agrees_with_the_distribution() -> None:
    calibration = Calibration(np.linspace(0.2, 0.6, 40), inverse_temperature=12.0)
    others = np.array([0.1, 0.05])
    own = np.linspace(-0.5, 1.0, 61)
    scores = np.column_stack([own, np.tile(others, (len(own), 1))])
    probabilities, unknown = calibration.distribution(
        scores, log_sum_exp(scores * calibration.inverse_temperature), 0.05
    )
    assert np.all(np.diff(probabilities[:, 0]) > 0)  # more similar: more confident
    assert np.all(np.diff(unknown) < 0)  # and less likely unknown
    flagged = calibration.unknown(np.maximum(own, 0.1), np.full(len(own), 0.05), 0.05)
    # Flagged exactly where "unknown" outweighs the best class (the top-1 here: own or 0.1).
    best = np.maximum(probabilities[:, 0], probabilities[:, 1])
    assert 0 < flagged.sum() < len(flagged)
    assert np.array_equal(flagged, unknown > best)


def test_the_fitted_temperature_beats_a_wrong_one_on_new_images() -> None:
    vectors, labels = clusters(10, 40, 1.2, seed=2)
    means, support = namespace(vectors, labels, 5)
    loo = leave_one_out_scores(means, np.full(10, 5), support)
    calibration = calibrate(loo)
    queries = np.concatenate([vectors[labels == c][5:] for c in range(10)])
    truth = np.repeat(np.arange(10), 35)
    scores = queries.astype(np.float64) @ l2_normalize(means.astype(np.float64)).T
    threshold = calibration.unknown_logit(0.05)
    fitted = calibration.inverse_temperature
    assert INVERSE_TEMPERATURE_RANGE[0] <= fitted <= INVERSE_TEMPERATURE_RANGE[1]
    for wrong in (1.0, 200.0):  # far too soft, far too sharp
        assert softmax_nll(scores, truth, threshold, fitted) < softmax_nll(scores, truth, threshold, wrong)
        assert top1_log_loss(scores, truth, threshold, fitted) < top1_log_loss(
            scores, truth, threshold, wrong
        )


def test_better_separated_classes_get_a_sharper_distribution() -> None:
    fitted = []
    for noise in (2.0, 0.5):
        vectors, labels = clusters(8, 10, noise, seed=3)
        means, support = namespace(vectors, labels, 10)
        fitted.append(calibrate(leave_one_out_scores(means, np.full(8, 10), support)).inverse_temperature)
    assert fitted[1] > fitted[0]


def test_a_fresh_own_score_divides_by_the_full_class_norm() -> None:
    vectors, _ = clusters(1, 5, 1.0, seed=4)
    mean = vectors.mean(axis=0)
    fresh = fresh_own_scores(mean, 5, vectors.astype(np.float64))
    for i, vector in enumerate(vectors):
        without = (mean * 5 - vector) / 4
        assert fresh[i] == pytest.approx(float(vector @ without) / float(np.linalg.norm(mean)), abs=1e-6)
    # Below the plain LOO cosine on average: that one divides by a (larger) 4-example mean's norm.
    plain = leave_one_out_scores(mean[None, :], np.array([5]), [vectors]).own_scores
    assert fresh.mean() > plain.mean()


def test_a_namespace_of_one_class_and_one_example_gets_sane_answers() -> None:
    vector = l2_normalize(np.random.default_rng(5).standard_normal((1, 16))).astype(np.float32)
    calibration = calibrate(leave_one_out_scores(vector, np.array([1]), [vector]))
    assert not calibration.calibrated  # nothing to fit: the defaults
    assert calibration.inverse_temperature == DEFAULT_INVERSE_TEMPERATURE
    matrix = PrototypeMatrix(["only"], vector)
    far = l2_normalize(-vector + 0.1).astype(np.float32)
    same, other = label_images(matrix, calibration, np.concatenate([vector, far]), 5, 0.05)
    assert [len(same.predictions), len(other.predictions)] == [1, 1]
    for result in (same, other):
        assert result.predictions[0].confidence + result.unknown_probability == pytest.approx(1.0)
    # The image itself: its class, likely; its opposite: unknown, and the flag says so.
    assert same.predictions[0].confidence > 0.9 and not same.unknown
    assert other.unknown_probability > 0.9 and other.unknown
    assert DEFAULT_THRESHOLD == calibration.threshold(0.05)


def test_a_tiny_namespace_keeps_the_temperature_in_range() -> None:
    # 2 classes x 6 perfectly separated shots: the fit would sharpen without bound; the prior and
    # the range keep new images from being answered with certainty 1.
    vectors, labels = clusters(2, 6, 0.05, seed=6)
    means, support = namespace(vectors, labels, 6)
    calibration = calibrate(leave_one_out_scores(means, np.full(2, 6), support))
    assert calibration.calibrated
    assert calibration.inverse_temperature <= INVERSE_TEMPERATURE_RANGE[1]
    matrix = PrototypeMatrix(["a", "b"], means)
    (result,) = label_images(matrix, calibration, vectors[:1], 2, 0.05)
    assert result.predictions[0].label == "a" and result.predictions[0].confidence < 1.0


def test_the_log_partition_matches_a_full_softmax_and_survives_patches() -> None:
    rng = np.random.default_rng(7)
    rows = l2_normalize(rng.standard_normal((50, 16))).astype(np.float32)
    matrix = PrototypeMatrix([f"c{i:02d}" for i in range(50)], rows)
    patched = matrix.patched({"c03": None, "c07": rows[8]})  # one deleted, one replaced
    queries = l2_normalize(rng.standard_normal((5, 16))).astype(np.float32)
    for version in (matrix, patched):
        expected = log_sum_exp((queries @ l2_normalize(version.prototypes).T).astype(np.float64) * 9.0)
        assert version.log_partition(queries, 9.0) == pytest.approx(expected, abs=1e-4)


def test_a_sampled_calibration_reads_the_best_few_classes_and_fits_about_the_same_temperature() -> None:
    from fewshot_service.classify.open_set import SAMPLED_SCORES_PER_EXAMPLE, calibrate_rows, loo_rows_against
    from fewshot_service.classify.snapshot import ExampleSnapshot

    vectors, labels = clusters(40, 6, 1.0, seed=8)
    means, support = namespace(vectors, labels, 6)
    names = [f"c{i:02d}" for i in range(40)]
    snapshot = ExampleSnapshot(
        names, means, np.full(40, 6), [[str(j) for j in range(6)]] * 40, support, "e", 1
    )
    matrix = PrototypeMatrix(names, means)
    top1, scores, own, fresh = loo_rows_against(matrix, snapshot)
    full = leave_one_out_scores(means, np.full(40, 6), support)
    assert scores.shape == (240, SAMPLED_SCORES_PER_EXAMPLE) and not own.any()
    # Column 0 is the LOO own score, the rest the best other classes, best first.
    assert scores[:, 0] == pytest.approx(full.own_scores, abs=1e-5)
    others = np.sort(np.where(np.eye(40, dtype=bool)[full.own], -np.inf, full.scores), axis=1)[:, ::-1]
    assert scores[:, 1:] == pytest.approx(others[:, : SAMPLED_SCORES_PER_EXAMPLE - 1], abs=1e-5)
    assert fresh[:, 0] == pytest.approx(full.fresh_own, abs=1e-5)
    sampled = calibrate_rows(top1, scores, own, fit_scores=fresh)
    exact = calibrate(full)
    assert sampled.threshold(0.05) == pytest.approx(exact.threshold(0.05), abs=1e-5)
    assert sampled.inverse_temperature == pytest.approx(exact.inverse_temperature, rel=0.25)


# The largest |int8 log partition - float32 one| the test below allows (in log units, so also the
# largest relative error of any confidence it gives). Measured on its data: see the test.
INT8_LOG_PARTITION_TOLERANCE = 2e-3


def test_above_the_int8_threshold_the_partition_comes_from_the_scan_and_matches_the_float32_one() -> None:
    """At >= INT8_SCAN_MIN_CLASSES the partition sums the int8 copy's approximate scores for all
    but the best candidates: within INT8_LOG_PARTITION_TOLERANCE of the float32 pass, on queries
    near a class (a few terms dominate) and on random ones (the approximate terms dominate), for
    the copy's own version and for a patched one whose deleted and replaced rows the copy still
    holds (masked out: deleting each query's own class moves its partition by far more than the
    tolerance, and summing the 1,000 other deleted rows would put it 0.1 off) and whose new rows
    the copy does not (scored in float32). Measured: 7.9e-4 at most (AMD EPYC, AVX-512)."""
    from fewshot_service.classify.prototypes import INT8_SCAN_MIN_CLASSES

    rng = np.random.default_rng(11)
    classes, dim = INT8_SCAN_MIN_CLASSES + 2000, 128
    rows = l2_normalize(rng.standard_normal((classes, dim))).astype(np.float32)
    names = [f"c{i:05d}" for i in range(classes)]
    matrix = PrototypeMatrix(names, rows)
    matrix.build_int8_scan()
    near = l2_normalize(rows[:24] + 0.5 * rng.standard_normal((24, dim)) / np.sqrt(dim))
    queries = np.concatenate([near, l2_normalize(rng.standard_normal((8, dim)))]).astype(np.float32)
    changes: dict[str, np.ndarray | None] = {names[i]: None for i in range(12)}  # own classes gone
    changes |= {names[i]: None for i in range(4000, 5000)}  # rows the copy sums: masked out
    changes |= {names[i]: rows[i + 100] for i in range(12, 24)}  # replaced by another row
    changes |= {f"new{i}": l2_normalize(rows[i] + 0.1 * rng.standard_normal(dim)) for i in range(30, 40)}
    patched = matrix.patched(changes)
    worst = 0.0
    for version in (matrix, patched):
        for beta in (DEFAULT_INVERSE_TEMPERATURE, INVERSE_TEMPERATURE_RANGE[1]):
            before = version.scan_stats.counts()
            ranked, approximate = version.top_k_and_log_partition(queries, 5, beta)
            after = version.scan_stats.counts()
            assert sum(after.values()) - sum(before.values()) == len(queries)  # the int8 path ran
            assert ranked == version.top_k(queries, 5)
            expected = version.log_partition(queries, beta)
            worst = max(worst, float(np.abs(approximate - expected).max()))
            if version is patched and beta == INVERSE_TEMPERATURE_RANGE[1]:
                unmasked = matrix.log_partition(queries[:12], beta)
                assert np.all(np.abs(unmasked - expected[:12]) > 10 * INT8_LOG_PARTITION_TOLERANCE)
            results = label_images(version, Calibration(np.zeros(0), beta), queries, 5, 0.05)
            for result in results:
                total = sum(p.confidence for p in result.predictions) + result.unknown_probability
                assert total <= 1.0 + 1e-9
    assert worst <= INT8_LOG_PARTITION_TOLERANCE, worst
    print(f"max |int8 - float32 log partition| = {worst:.2e}")
    # Random queries at 1/T = 30: bound / T is past INT8_PARTITION_MAX_SPREAD and the copy's rows
    # are nearly all of Z, so the worst case is wide: each gets the float32 pass (unguarded, the
    # int8 sum was up to 9e-4 off on these, 4e-3 on 64 others in a trial).
    spread_queries = queries[24:]
    _, guarded = matrix.top_k_and_log_partition(spread_queries, 5, 30.0)
    assert guarded == pytest.approx(matrix.log_partition(spread_queries, 30.0), abs=1e-6)
