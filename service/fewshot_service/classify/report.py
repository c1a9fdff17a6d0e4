"""A namespace's report: will its classes work? Judged leave-one-out (LOO) on its own examples.

Each (sampled) example is classified against its class's prototype *without it* and every other
class's full prototype -- what a new image of the class would meet, with one shot fewer -- so

- a class's **LOO accuracy** is the share of its examples classified as their own class;
- the **expected accuracy** is that share over every judged example (slightly pessimistic: each
  judged example's class has one shot fewer than new images will meet);
- **confused pairs** are pairs of classes whose examples go to each other LOO (with how many
  each way), and each class's nearest other prototype, with the two prototypes' cosine;
- a class **needs more shots** when it has fewer than :data:`RECOMMENDED_SHOTS` or under
  :data:`LOW_ACCURACY` of its examples are right LOO (its shots do not yet pin it down), and
  **cleaner shots** when a minority of its examples are likely mislabels (shot_quality.py's rule:
  another class's prototype is closer than its own class without it) -- a few shots disagree
  with the rest, where a majority would mean a hard class, not dirty shots.

The other classes are the replica's :class:`PrototypeMatrix` (the one Classify uses), read by a
top-k per example, so the work is (judged examples) x (classes), not (classes)^2; the caller
bounds the judged examples (core/reports.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from fewshot_common.vectors import l2_normalize

from .shot_quality import ExampleQuality

if TYPE_CHECKING:
    from .prototypes import PrototypeMatrix
    from .snapshot import ExampleSnapshot

RECOMMENDED_SHOTS = 5
LOW_ACCURACY = 0.5
# Likely mislabels up to this share of a class's judged examples read as "a few bad shots".
CLEANER_SHOTS_SHARE = 1 / 3
MAX_CONFUSED_PAIRS = 10

Need = Literal["more_shots", "cleaner_shots"]


@dataclass(frozen=True)
class ClassJudgement:
    label: str
    count: int  # the class's examples (all of them, judged or not)
    loo_accuracy: float | None  # None: fewer than 2 examples, nothing to leave out
    nearest_label: str | None  # the class whose prototype is closest; None with one class
    nearest_similarity: float | None
    needs: list[Need] = field(default_factory=list)
    suspect_example_ids: list[str] = field(default_factory=list)  # likely mislabels


@dataclass(frozen=True)
class ConfusedPair:
    a: str  # a < b
    b: str
    similarity: float  # cosine between the two prototypes
    a_as_b: int  # judged examples of a classified (LOO) as b
    b_as_a: int


@dataclass(frozen=True)
class NamespaceReport:
    classes: int
    examples: int
    judged_examples: int
    expected_accuracy: float | None  # None: no class has two examples
    per_class: list[ClassJudgement]  # the judged classes, worst LOO accuracy first
    confused_pairs: list[ConfusedPair]  # most LOO confusions first, then most similar
    sampled: bool = False  # set by the caller: only some classes or examples were judged


def _nearest_others(
    classifier: PrototypeMatrix, label: str, queries: np.ndarray
) -> list[tuple[str, float] | None]:
    """Per row of ``queries``: the closest class of ``classifier`` other than ``label``, and its
    score (a top-2: ``label`` itself may be one of them)."""
    if len(queries) == 0 or len(classifier) < 2:
        return [None] * len(queries)
    found: list[tuple[str, float] | None] = []
    for predictions in classifier.top_k(np.ascontiguousarray(queries, dtype=np.float32), 2):
        other = next((p for p in predictions if p.label != label), None)
        found.append((other.label, other.score) if other is not None else None)
    return found


def judge_namespace(
    classifier: PrototypeMatrix,
    sample: ExampleSnapshot,
    total_examples: int,
    max_pairs: int = MAX_CONFUSED_PAIRS,
) -> NamespaceReport:
    """The report of the classes in ``sample`` (their means, counts and some examples, as of one
    state) against every class of ``classifier`` (that state or a moment newer)."""
    judgements: list[ClassJudgement] = []
    confusions: Counter[tuple[str, str]] = Counter()  # (own, predicted) over wrong LOO answers
    nearest_pairs: dict[tuple[str, str], float] = {}
    right_total = judged_total = 0
    for c, label in enumerate(sample.labels):
        vectors, count = sample.embeddings[c], int(sample.counts[c])
        prototype = l2_normalize(sample.means[c : c + 1].astype(np.float64))[0]
        nearest = _nearest_others(classifier, label, prototype[None, :])[0]
        if nearest is not None:
            nearest_pairs[tuple(sorted((label, nearest[0])))] = nearest[1]  # type: ignore[index]
        suspects: list[str] = []
        accuracy = None
        if count >= 2 and len(vectors):
            without_self = l2_normalize(sample.means[c].astype(np.float64) * count - vectors)
            own = np.sum(vectors * without_self, axis=1)
            right = 0
            others = _nearest_others(classifier, label, vectors)
            for row, (example_id, other) in enumerate(zip(sample.example_ids[c], others)):
                quality = ExampleQuality(
                    example_id, float(own[row]), other[0] if other else None, other[1] if other else None
                )
                if quality.likely_mislabel:
                    suspects.append(example_id)
                    confusions[(label, quality.nearest_other_label or "")] += 1
                else:
                    right += 1
            accuracy = right / len(vectors)
            right_total += right
            judged_total += len(vectors)
        needs: list[Need] = []
        if count < RECOMMENDED_SHOTS or (accuracy is not None and accuracy < LOW_ACCURACY):
            needs.append("more_shots")
        if suspects and len(suspects) <= CLEANER_SHOTS_SHARE * len(vectors):
            needs.append("cleaner_shots")
        judgements.append(
            ClassJudgement(
                label,
                count,
                accuracy,
                nearest[0] if nearest else None,
                nearest[1] if nearest else None,
                needs,
                suspects,
            )
        )
    judgements.sort(key=lambda j: (j.loo_accuracy is None, j.loo_accuracy or 0.0, j.label))
    return NamespaceReport(
        classes=len(classifier),
        examples=total_examples,
        judged_examples=judged_total,
        expected_accuracy=right_total / judged_total if judged_total else None,
        per_class=judgements,
        confused_pairs=_confused_pairs(classifier, confusions, nearest_pairs, max_pairs),
    )


def _confused_pairs(
    classifier: PrototypeMatrix,
    confusions: Counter[tuple[str, str]],
    nearest_pairs: dict[tuple[str, str], float],
    max_pairs: int,
) -> list[ConfusedPair]:
    """Every pair with a LOO confusion, and each class's nearest-prototype pair, ranked."""
    pairs: dict[tuple[str, str], float | None] = dict(nearest_pairs)
    for own, predicted in confusions:
        pairs.setdefault(tuple(sorted((own, predicted))), None)  # type: ignore[arg-type]
    found = []
    for (a, b), similarity in pairs.items():
        if similarity is None:
            row_a, row_b = classifier.unit_row(a), classifier.unit_row(b)
            if row_a is None or row_b is None:  # deleted since the sample was read
                continue
            similarity = float(row_a.astype(np.float64) @ row_b.astype(np.float64))
        found.append(ConfusedPair(a, b, similarity, confusions[(a, b)], confusions[(b, a)]))
    found.sort(key=lambda p: (-(p.a_as_b + p.b_as_a), -p.similarity, p.a, p.b))
    return found[:max_pairs]
