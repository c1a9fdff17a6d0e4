"""The nearest other class of each example (the shot-quality warnings' comparison), kept by a
namespace's matrix and carried over patches by the changed rows alone: after any sequence of
random adds, changes and deletes of classes (exact ties included) its answers equal a brute-force
computation over every class, and a fresh matrix's top-2, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_service.classify.exact import exact_scores
from fewshot_service.classify.prototypes import PrototypeMatrix

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def brute_force(
    matrix: PrototypeMatrix, label: str, vectors: np.ndarray
) -> list[tuple[str | None, float | None]]:
    """Every other class scored exactly; the best by score, then label."""
    answers: list[tuple[str | None, float | None]] = []
    for vector in vectors:
        scores = exact_scores(matrix.matrix, vector)
        ranked = sorted((-float(s), other) for other, s in zip(matrix.labels, scores) if other != label)
        answers.append((ranked[0][1], -ranked[0][0]) if ranked else (None, None))
    return answers


@pytest.mark.parametrize("seed", range(6))
def test_cached_nearest_others_equal_brute_force_after_random_changes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = {f"c{i:03d}": rng.standard_normal(DIM).astype(np.float32) for i in range(60)}
    rows["twin a"] = rows["twin b"] = rows["c000"].copy()  # exact ties break by label
    matrix = PrototypeMatrix(sorted(rows), np.stack([rows[k] for k in sorted(rows)]))
    current = dict(rows)  # the means as given, for a fresh matrix of the same state
    asked: dict[str, np.ndarray] = {}  # class -> its examples, as a GET would ask
    next_label = 100
    for step in range(80):
        changes: dict[str, np.ndarray | None] = {}
        for _ in range(int(rng.integers(1, 4))):
            action, live = rng.integers(4), matrix.labels
            if action == 0 or len(live) < 5:  # a new class, sometimes a copy of another's row
                row = rows[live[0]] if rng.random() < 0.2 and live else rng.standard_normal(DIM)
                changes[f"c{next_label:03d}"], next_label = np.asarray(row, np.float32), next_label + 1
            elif action == 1:
                changes[live[int(rng.integers(len(live)))]] = None
            else:  # a class's mean moves: sometimes towards an asked example (it becomes nearest)
                target = live[int(rng.integers(len(live)))]
                if asked and rng.random() < 0.5:
                    vectors = asked[list(asked)[int(rng.integers(len(asked)))]]
                    changes[target] = vectors[0] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
                else:
                    changes[target] = rng.standard_normal(DIM).astype(np.float32)
        matrix = matrix.patched(changes)
        for label, row in changes.items():
            if row is None:
                del current[label]
            else:
                current[label] = row
        for label in list(asked):
            if label not in matrix.labels:
                del asked[label]
        for label in matrix.labels[:: max(1, len(matrix) // 6)][:6]:
            asked.setdefault(label, unit(rng.standard_normal((int(rng.integers(1, 4)), DIM))))
        if step % 7 == 0:  # a class whose own examples were both nearest-tied twins' neighbours
            asked["twin probe"] = unit(np.stack([rows["c000"], rng.standard_normal(DIM)]))
        fresh = PrototypeMatrix(sorted(current), np.stack([current[k] for k in sorted(current)]))
        for label, vectors in asked.items():
            cached = matrix.nearest_others(label, vectors)
            assert cached == brute_force(matrix, label, vectors), (step, label)
            assert cached == fresh.nearest_others(label, vectors)
    stats = matrix.nearest_cache
    assert stats.hits > stats.misses  # the answers above came mostly from the carried cache


def test_a_class_asked_again_after_other_classes_changed_needs_no_scan() -> None:
    rng = np.random.default_rng(1)
    labels = [f"c{i}" for i in range(50)]
    matrix = PrototypeMatrix(labels, rng.standard_normal((50, DIM)))
    probe = unit(rng.standard_normal((2, DIM)))
    first = matrix.nearest_others("c3", probe)
    misses = matrix.nearest_cache.misses
    # Another class moves right onto the first example: it becomes that example's nearest.
    moved = next(c for c in labels if c not in {"c3", first[0][0], first[1][0]})
    matrix = matrix.patched({"new": probe[0] * 3.0, moved: -probe[1]})  # moved: far from both
    again = matrix.nearest_others("c3", probe)
    assert again[0] == ("new", pytest.approx(1.0, abs=1e-6)) and again != first
    assert matrix.nearest_cache.misses == misses  # carried, not recomputed
    # The nearest class deleted: that class's answers are dropped and recomputed, still exact.
    matrix = matrix.patched({"new": None})
    assert matrix.nearest_others("c3", probe) == brute_force(matrix, "c3", probe)
    assert matrix.nearest_cache.misses == misses + 1
    # A class alone in its namespace has no other class.
    single = PrototypeMatrix(["only"], rng.standard_normal((1, DIM)))
    assert single.nearest_others("only", probe) == [(None, None), (None, None)]


def test_the_cache_holds_at_most_its_rows_and_forgets_the_least_recently_asked() -> None:
    from fewshot_service.classify.nearest_others import NearestOthers

    rng = np.random.default_rng(4)
    labels = [f"c{i:02d}" for i in range(40)]
    matrix = PrototypeMatrix(labels, rng.standard_normal((40, DIM)))
    cache = NearestOthers(matrix, max_rows=8)
    probes = {label: unit(rng.standard_normal((3, DIM))) for label in labels[:6]}

    def ask(m: PrototypeMatrix, label: str) -> list[tuple[str | None, float | None]]:
        return cache.lookup(m, label, probes[label], lambda: brute_force(m, label, probes[label]))

    for label in labels[:4]:  # 12 rows asked; the cache keeps the last two classes' 6
        ask(matrix, label)
    assert cache.rows == 6 and cache.misses == 4
    ask(matrix, labels[3])
    assert cache.hits == 1
    ask(matrix, labels[0])  # evicted: computed again
    assert cache.misses == 5 and cache.rows == 6
    changes = {"c10": rng.standard_normal(DIM).astype(np.float32), "c11": None}
    patched = PrototypeMatrix(labels, matrix.prototypes).patched(changes)  # any next version
    cache.follow(matrix, patched, changes, patched.unit_row)
    for label in (labels[0], labels[3]):
        assert ask(patched, label) == brute_force(patched, label, probes[label])
    cache.follow(matrix, patched, changes, patched.unit_row)  # from a version it does not hold: empty
    assert cache.rows == 0
