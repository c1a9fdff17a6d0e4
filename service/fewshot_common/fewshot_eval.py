"""The few-shot protocol of ``shared/data/tiny-imagenet/README.md``, in pure numpy.

Every image is embedded once; each protocol then only draws indices. A query is classified by
cosine similarity to class prototypes (the mean of its class's support embeddings); the nearest
prototype wins.

- ``5wayKshot`` (K = 1, 5): ``episodes`` episodes of 5 random classes with K support and
  ``queries`` query images each; mean accuracy and 95% interval ``1.96 * std / sqrt(episodes)``.
- ``allway5shot``: every class at once, 5 support images per class, every other image a query;
  mean over ``draws`` random draws (and the same interval over the draws).

Accuracies are reported in percent, like the baseline table in that README. No torch here: the
trainer's probe and the ``fewshot eval`` command both call :func:`evaluate_embeddings`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import numpy as np

from .vectors import l2_normalize

EPISODE_WAYS = 5
EPISODE_QUERIES = 15
ALLWAY_SHOTS = 5
ALLWAY_DRAWS = 10


class ProtocolResult(TypedDict):
    mean: float  # accuracy in percent
    ci95: float  # half-width of the 95% interval, in percent
    trials: int  # episodes (or draws) averaged
    ways: int
    shots: int
    queries_per_class: int  # 0 for all-way: there every non-support image is a query


def _summary(accuracies: list[float], *, ways: int, shots: int, queries: int) -> ProtocolResult:
    acc = 100.0 * np.asarray(accuracies, dtype=np.float64)
    return ProtocolResult(
        mean=float(acc.mean()),
        ci95=float(1.96 * acc.std() / np.sqrt(len(acc))),
        trials=len(acc),
        ways=ways,
        shots=shots,
        queries_per_class=queries,
    )


# (support embeddings per class [n_c, D], query embeddings [M, D]) -> scores [M, classes]: the
# classifier under test. The protocol's is nearest_prototype_scores; bench/ablate_serve_time.py
# passes others (the draws stay the same, so rows compare episode by episode).
Scorer = Callable[[list[np.ndarray], np.ndarray], np.ndarray]


def nearest_prototype_scores(support: list[np.ndarray], queries: np.ndarray) -> np.ndarray:
    """Cosine similarity to each class's prototype (the mean of its support embeddings)."""
    prototypes = l2_normalize(np.stack([vectors.mean(axis=0) for vectors in support]))
    return queries @ prototypes.T


def _accuracy(
    embeddings: np.ndarray, support: list[np.ndarray], query: list[np.ndarray], scorer: Scorer
) -> float:
    """Accuracy of ``scorer``'s best class; ``support[c]``/``query[c]`` index class ``c``."""
    query_idx = np.concatenate(query)
    truth = np.repeat(np.arange(len(query)), [len(idx) for idx in query])
    # Ties go to the lowest class position, which is random per draw, so no class is favoured.
    predicted = np.argmax(scorer([embeddings[idx] for idx in support], embeddings[query_idx]), axis=1)
    return float(np.mean(predicted == truth))


def _indices_by_class(labels: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def episode_accuracy(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ways: int = EPISODE_WAYS,
    shots: int,
    queries: int = EPISODE_QUERIES,
    episodes: int,
    rng: np.random.Generator,
    scorer: Scorer = nearest_prototype_scores,
) -> ProtocolResult:
    """``ways``-way ``shots``-shot episodes. ``embeddings`` must already be L2-normalised."""
    by_class = _indices_by_class(labels)
    if len(by_class) < ways:
        raise ValueError(f"{ways}-way episodes need at least {ways} classes, got {len(by_class)}")
    smallest = min(len(idx) for idx in by_class)
    if smallest < shots + queries:
        raise ValueError(
            f"{ways}-way {shots}-shot episodes with {queries} queries need {shots + queries} "
            f"images in every class; the smallest class has {smallest}"
        )
    accuracies = []
    for _ in range(episodes):
        chosen = rng.choice(len(by_class), size=ways, replace=False)
        drawn = [rng.permutation(by_class[c])[: shots + queries] for c in chosen]
        accuracies.append(
            _accuracy(embeddings, [d[:shots] for d in drawn], [d[shots:] for d in drawn], scorer)
        )
    return _summary(accuracies, ways=ways, shots=shots, queries=queries)


def allway_accuracy(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    shots: int = ALLWAY_SHOTS,
    draws: int = ALLWAY_DRAWS,
    rng: np.random.Generator,
    scorer: Scorer = nearest_prototype_scores,
) -> ProtocolResult:
    """All classes at once: ``shots`` support per class, every other image a query."""
    by_class = _indices_by_class(labels)
    if len(by_class) < 2:
        raise ValueError(f"all-way evaluation needs at least 2 classes, got {len(by_class)}")
    smallest = min(len(idx) for idx in by_class)
    if smallest < shots + 1:
        raise ValueError(
            f"all-way {shots}-shot needs at least {shots + 1} images in every class; "
            f"the smallest class has {smallest}"
        )
    accuracies = []
    for _ in range(draws):
        order = rng.permutation(len(by_class))
        shuffled = [rng.permutation(by_class[c]) for c in order]
        accuracies.append(
            _accuracy(embeddings, [s[:shots] for s in shuffled], [s[shots:] for s in shuffled], scorer)
        )
    return _summary(accuracies, ways=len(by_class), shots=shots, queries=0)


def check_class_sizes(labels: np.ndarray, *, queries: int = EPISODE_QUERIES) -> None:
    """Raise ``ValueError`` unless every protocol can be drawn from ``labels`` (cheap: run it
    before embedding anything)."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    if len(counts) < EPISODE_WAYS:
        raise ValueError(
            f"{EPISODE_WAYS}-way episodes need at least {EPISODE_WAYS} classes, got {len(counts)}"
        )
    needed = max(5 + queries, ALLWAY_SHOTS + 1)
    if counts.min() < needed:
        raise ValueError(
            f"5-way 5-shot episodes with {queries} queries need {needed} images in every class; "
            f"the smallest class has {counts.min()}"
        )


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    episodes: int = 600,
    seed: int = 0,
    queries: int = EPISODE_QUERIES,
    allway_draws: int = ALLWAY_DRAWS,
    scorer: Scorer = nearest_prototype_scores,
) -> dict[str, ProtocolResult]:
    """Run the whole protocol; keys ``5way1shot``, ``5way5shot``, ``allway5shot``.

    ``embeddings`` is ``[N, D]`` (normalised here, so raw features are fine), ``labels`` any ``[N]``
    array of class ids. Each protocol draws from its own child of ``seed``, so a result does not
    depend on which other protocols ran.
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(f"need embeddings [N, D] and labels [N], got {embeddings.shape} and {labels.shape}")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings contain NaN or infinite values")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    check_class_sizes(labels, queries=queries)
    normalized = l2_normalize(np.asarray(embeddings, dtype=np.float64))
    rng_1shot, rng_5shot, rng_allway = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    return {
        "5way1shot": episode_accuracy(
            normalized, labels, shots=1, queries=queries, episodes=episodes, rng=rng_1shot, scorer=scorer
        ),
        "5way5shot": episode_accuracy(
            normalized, labels, shots=5, queries=queries, episodes=episodes, rng=rng_5shot, scorer=scorer
        ),
        "allway5shot": allway_accuracy(normalized, labels, draws=allway_draws, rng=rng_allway, scorer=scorer),
    }
