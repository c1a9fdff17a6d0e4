"""Issue 31 part A: shot-quality judgements of one class read the class and the replica's synced
prototype matrix, not every prototype of the namespace, and judge as the whole-namespace snapshot
did (real Redis; the same registry code a server runs)."""

from __future__ import annotations

import numpy as np
import pytest
import redis as redis_py

from fewshot_common.vectors import l2_normalize
from fewshot_service.classify.shot_quality import (
    add_warnings,
    confusions,
    example_quality,
)
from fewshot_service.registry.registry import Registry

DIM = 16
# Float32 matrix rows against float64 means: scores agree to a few float32 ulps.
SCORE_TOLERANCE = 1e-5


@pytest.fixture
def registry(redis_url: str) -> Registry:
    return Registry(redis_py.Redis.from_url(redis_url), key_prefix="shotq")


def _fill(registry: Registry, classes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((classes, DIM)))
    data = {
        f"c{i:04d}": l2_normalize(centres[i] + 0.6 * rng.standard_normal((3 + i % 3, DIM)))
        for i in range(classes)
    }
    registry.add_classes("ns", data, "m")
    return data


def _views(registry: Registry, label: str):
    whole = registry.example_snapshot("ns", only_labels=[label], model_id="m")
    own = registry.example_snapshot("ns", only_labels=[label], only_their_means=True, model_id="m")
    return whole, own, registry.prototypes("ns", "m").classifier


def test_matrix_judgements_match_the_whole_namespace_snapshot(
    registry: Registry,
) -> None:
    _fill(registry, 300, seed=3)
    mislabels = 0
    for label in ["c0000", "c0007", "c0150", "c0299"]:
        whole, own, matrix = _views(registry, label)
        assert own.labels == [label] and len(whole.labels) == 300  # one class read, not 300
        old, new = example_quality(whole, label), example_quality(own, label, matrix)
        assert [(q.example_id, q.nearest_other_label, q.likely_mislabel) for q in new] == [
            (q.example_id, q.nearest_other_label, q.likely_mislabel) for q in old
        ]
        for a, b in zip(old, new):
            assert a.consistency == b.consistency
            assert abs(a.nearest_other_score - b.nearest_other_score) < SCORE_TOLERANCE
        mislabels += sum(q.likely_mislabel for q in new)
        ids = whole.example_ids[whole.labels.index(label)]
        old_warnings = add_warnings(whole, label, ids, 0.9)
        new_warnings = add_warnings(own, label, ids, 0.9, matrix)
        assert [(w.example_id, w.kind, w.other) for w in new_warnings] == [
            (w.example_id, w.kind, w.other) for w in old_warnings
        ]
        old_c, new_c = confusions(whole, label, 7), confusions(own, label, 7, matrix)
        assert [(c.label, c.examples_closer) for c in new_c] == [(c.label, c.examples_closer) for c in old_c]
        assert all(
            abs(a.prototype_similarity - b.prototype_similarity) < SCORE_TOLERANCE
            for a, b in zip(old_c, new_c)
        )
    assert mislabels > 0  # the noise makes some examples closer to another class: both paths see them


def test_an_older_matrix_version_still_finds_its_own_rows(registry: Registry) -> None:
    data = _fill(registry, 20, seed=4)
    before = registry.prototypes("ns", "m").classifier
    old_row = before.unit_row("c0003").copy()
    registry.add_examples("ns", "c0003", l2_normalize(np.ones((1, DIM))), "m")
    after = registry.prototypes("ns", "m").classifier
    assert np.array_equal(before.unit_row("c0003"), old_row)  # a reader of the older state
    assert not np.array_equal(after.unit_row("c0003"), old_row)
    expected = l2_normalize(np.concatenate([data["c0003"], l2_normalize(np.ones((1, DIM)))]).mean(0))
    assert np.allclose(after.unit_row("c0003"), expected, atol=1e-6)
    assert after.unit_row("nope") is None


def test_confusions_and_quality_across_the_int8_scan_size(registry: Registry) -> None:
    from fewshot_service.classify.prototypes import INT8_SCAN_MIN_CLASSES

    _fill(registry, INT8_SCAN_MIN_CLASSES + 10, seed=5)
    whole, own, matrix = _views(registry, "c0042")
    matrix.build_int8_scan()
    old, new = example_quality(whole, "c0042"), example_quality(own, "c0042", matrix)
    assert [q.nearest_other_label for q in new] == [q.nearest_other_label for q in old]
    assert [c.label for c in confusions(own, "c0042", 5, matrix)] == [
        c.label for c in confusions(whole, "c0042", 5)
    ]
    assert matrix.scan_stats.counts()["int8"] > 0  # the large namespace was answered by the int8 scan


def test_nearest_others_kept_across_random_writes_equal_brute_force(registry: Registry) -> None:
    """The replica keeps each asked class's nearest others and carries them over the classes
    each write changed (no top-2 over the matrix again); after random adds and deletes through
    Redis they equal an exact scoring of every class, and the whole-namespace judgement."""
    from fewshot_service.classify.exact import exact_scores

    data = _fill(registry, 120, seed=5)
    rng = np.random.default_rng(9)
    asked = ["c0001", "c0040", "c0077", "c0119"]
    for step in range(40):
        label = f"c{int(rng.integers(0, 130)):04d}"
        classes = {c.label: c for c in registry.list_classes("ns")}
        if label in asked or rng.random() < 0.6 or label not in classes:
            near = data[asked[int(rng.integers(len(asked)))]][0]  # sometimes right next to an asked one
            registry.add_examples("ns", label, l2_normalize(near + 0.3 * rng.standard_normal((1, DIM))), "m")
        elif rng.random() < 0.5:
            registry.delete_class("ns", label)
        else:
            registry.delete_example("ns", label, registry.get_class("ns", label).example_ids[0])
        for target in asked:
            whole, own, matrix = _views(registry, target)
            new = example_quality(own, target, matrix)
            for q, vector in zip(new, own.embeddings[0]):
                scores = exact_scores(matrix.matrix, vector)
                best = min((-float(s), other) for other, s in zip(matrix.labels, scores) if other != target)
                assert (q.nearest_other_label, q.nearest_other_score) == (best[1], -best[0]), step
            old = example_quality(whole, target)
            assert [q.nearest_other_label for q in new] == [q.nearest_other_label for q in old]
    cache = registry.prototypes("ns", "m").classifier.nearest_cache
    assert cache.hits > 3 * cache.misses  # carried over the writes, not recomputed
    assert registry.sync_stats.counts()["full"] == 1  # every write was a patch of the replica's copy
