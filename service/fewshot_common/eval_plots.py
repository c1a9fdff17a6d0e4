"""``fewshot eval --plot``: accuracy per class and the most confused class pairs, as one PNG.

Both come from the all-way 5-shot protocol of :mod:`fewshot_eval` (every class at once, 5 support
images per class, every other image a query) repeated over a few random draws, because there every
class competes with every other: 5-way episodes would hide which classes a model mixes up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .fewshot_eval import ALLWAY_DRAWS, ALLWAY_SHOTS, l2_normalize
from .plotting import load_pyplot

TOP_PAIRS = 10


class ConfusedPair(NamedTuple):
    first: str
    second: str
    rate: float  # share of the two classes' queries given to the other class of the pair


def allway_confusion(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    shots: int = ALLWAY_SHOTS,
    draws: int = ALLWAY_DRAWS,
    seed: int = 0,
) -> np.ndarray:
    """``[true, predicted]`` query counts summed over ``draws`` all-way ``shots``-shot draws.

    ``labels`` are indices into ``range(num_classes)``; a class with no more than ``shots`` images
    (e.g. all unreadable) takes no part and keeps an all-zero row and column.
    """
    normalized = l2_normalize(embeddings)
    present = [c for c in range(num_classes) if np.count_nonzero(labels == c) > shots]
    rng = np.random.default_rng(seed)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for _ in range(draws):
        shuffled = [rng.permutation(np.flatnonzero(labels == c)) for c in present]
        prototypes = l2_normalize(np.stack([normalized[s[:shots]].mean(axis=0) for s in shuffled]))
        for true_class, indices in zip(present, shuffled):
            predicted = np.argmax(normalized[indices[shots:]] @ prototypes.T, axis=1)
            np.add.at(confusion[true_class], np.asarray(present)[predicted], 1)
    return confusion


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Percent of each class's queries classified right; NaN for a class that had none."""
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * np.diag(confusion) / totals


def most_confused_pairs(
    confusion: np.ndarray, classes: Sequence[str], top: int = TOP_PAIRS
) -> list[ConfusedPair]:
    """Class pairs by the share of their queries that went to the other one (both directions)."""
    totals = confusion.sum(axis=1)
    pairs = []
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            mixed = confusion[i, j] + confusion[j, i]
            if mixed:
                pairs.append(ConfusedPair(classes[i], classes[j], 100.0 * mixed / (totals[i] + totals[j])))
    return sorted(pairs, key=lambda pair: -pair.rate)[:top]


def write_eval_plot(confusion: np.ndarray, classes: Sequence[str], path: Path, *, title: str) -> Path:
    """Two panels: accuracy per class (worst at the top) and the most confused pairs."""
    plt = load_pyplot()
    accuracy = per_class_accuracy(confusion)
    order = [i for i in np.argsort(accuracy) if np.isfinite(accuracy[i])]
    pairs = most_confused_pairs(confusion, classes)
    height = max(4.0, 0.22 * max(len(order), len(pairs)) + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, height), constrained_layout=True)

    left.barh([classes[i] for i in order], accuracy[order], color="tab:blue")
    left.axvline(100.0 / max(len(order), 1), color="grey", linestyle="--")
    left.set_xlim(0, 100)
    left.invert_yaxis()
    left.set_xlabel("accuracy % (dashed: chance)")
    left.set_title(f"accuracy per class (all-way {ALLWAY_SHOTS}-shot, worst first)")

    if pairs:
        right.barh([f"{p.first} / {p.second}" for p in pairs], [p.rate for p in pairs], color="tab:red")
        right.invert_yaxis()
    else:
        right.text(0.5, 0.5, "no class was mistaken for another", ha="center", va="center")
    right.set_xlabel("% of the pair's queries given to the other class")
    right.set_title(f"most confused pairs (top {TOP_PAIRS})")

    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
