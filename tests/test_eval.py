"""The few-shot protocol (pure numpy) and the ``fewshot eval`` command on a real exported model."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot_trainer.fewshot_eval import (
    _nearest_prototype_accuracy,
    allway_accuracy,
    episode_accuracy,
    evaluate_embeddings,
    l2_normalize,
)


def _clustered(classes: int, per_class: int, dim: int, noise: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centers[labels] + noise * rng.normal(size=(len(labels), dim)), labels


# --- protocol -------------------------------------------------------------------------------------


def test_nearest_prototype_by_cosine_on_hand_made_points() -> None:
    # Class 0 points along +x, class 1 along +y. Query 2 is closer to class 0 by cosine, though
    # it is labelled 1: exactly one of four queries is wrong.
    emb = l2_normalize(
        np.array(
            [[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0],  # support
             [2.0, 0.5], [3.0, 1.0], [1.0, 0.2], [0.3, 5.0]]  # queries
        )
    )
    support = [np.array([0, 1]), np.array([2, 3])]
    query = [np.array([4, 5]), np.array([6, 7])]
    assert _nearest_prototype_accuracy(emb, support, query) == pytest.approx(0.75)


def test_prototype_is_the_mean_of_support_embeddings() -> None:
    # Class 0's support sits at +-80 degrees (its mean points along 0 degrees), class 1's at 50,
    # the query at 20: a nearest-*example* rule would pick class 1 (30 degrees away versus 60);
    # the prototype rule picks class 0 (20 degrees versus 30).
    angles = np.deg2rad([80.0, -80.0, 50.0, 20.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    support = [np.array([0, 1]), np.array([2])]
    assert _nearest_prototype_accuracy(emb, support, [np.array([3]), np.array([], int)]) == 1.0
    assert _nearest_prototype_accuracy(emb, support, [np.array([], int), np.array([3])]) == 0.0


def test_separable_embeddings_score_far_above_chance_and_shuffled_labels_near_chance() -> None:
    emb, labels = _clustered(classes=20, per_class=30, dim=32, noise=1.0)
    result = evaluate_embeddings(emb, labels, episodes=200, seed=0)
    assert set(result) == {"5way1shot", "5way5shot", "allway5shot"}
    assert result["5way1shot"]["mean"] > 80
    assert result["5way5shot"]["mean"] > 95
    assert result["allway5shot"]["mean"] > 80
    assert result["5way5shot"]["mean"] >= result["5way1shot"]["mean"]

    shuffled = np.random.default_rng(7).permutation(labels)
    chance = evaluate_embeddings(emb, shuffled, episodes=200, seed=0)
    for key, level in (("5way1shot", 20), ("5way5shot", 20), ("allway5shot", 5)):
        # Within about three of its own 95% intervals of chance.
        assert abs(chance[key]["mean"] - level) < max(3.5, 1.6 * chance[key]["ci95"] * 2), key


def test_interval_is_1_96_std_over_sqrt_trials_and_counts_are_reported() -> None:
    emb, labels = _clustered(classes=6, per_class=25, dim=8, noise=2.0)
    norm = l2_normalize(emb)
    a = episode_accuracy(norm, labels, shots=1, episodes=50, rng=np.random.default_rng(3))
    # Redraw the same episodes by hand and recompute the summary.
    rng = np.random.default_rng(3)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    accs = []
    for _ in range(50):
        chosen = rng.choice(len(by_class), size=5, replace=False)
        drawn = [rng.permutation(by_class[c])[:16] for c in chosen]
        accs.append(_nearest_prototype_accuracy(norm, [d[:1] for d in drawn], [d[1:] for d in drawn]))
    accs = 100 * np.array(accs)
    assert a["mean"] == pytest.approx(accs.mean())
    assert a["ci95"] == pytest.approx(1.96 * accs.std() / np.sqrt(50))
    assert (a["trials"], a["ways"], a["shots"], a["queries_per_class"]) == (50, 5, 1, 15)
    assert 0 < a["ci95"] < 20


def test_allway_uses_every_class_and_every_other_image() -> None:
    emb, labels = _clustered(classes=7, per_class=9, dim=8, noise=0.01)
    result = allway_accuracy(l2_normalize(emb), labels, draws=4, rng=np.random.default_rng(0))
    assert (result["ways"], result["shots"], result["trials"]) == (7, 5, 4)
    assert result["mean"] == 100.0


def test_same_seed_same_numbers_and_protocols_draw_independently() -> None:
    emb, labels = _clustered(classes=8, per_class=25, dim=16, noise=2.5)
    first = evaluate_embeddings(emb, labels, episodes=60, seed=5)
    assert evaluate_embeddings(emb, labels, episodes=60, seed=5) == first
    assert evaluate_embeddings(emb, labels, episodes=60, seed=6) != first
    # Raw (unnormalised) features give the same answer: normalisation happens inside.
    assert evaluate_embeddings(emb * 7.0, labels, episodes=60, seed=5) == first


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        (np.zeros((10, 4)), np.zeros(9), "labels"),
        (np.full((30, 4), np.nan), np.repeat(np.arange(5), 6), "NaN"),
        (np.ones((40, 4)), np.repeat(np.arange(4), 10), "at least 5 classes"),
        (np.ones((50, 4)), np.repeat(np.arange(5), 10), "smallest class has 10"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(embeddings, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(embeddings, labels, episodes=5)
