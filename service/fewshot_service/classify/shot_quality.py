"""Shot quality: how well each example of a class fits it, judged leave-one-out.

- an example is a **likely mislabel** when another class's prototype is closer to it than its own
  class's prototype without it (``(sum_c - e) / (n_c - 1)``);
- a new example is a **near duplicate** when its cosine similarity to an example already in the
  class (or added before it in the same request) is at least ``duplicate_similarity``: the same
  image twice would count twice in the prototype;
- a class's **confusions** are the classes whose prototypes are most similar to its own, with how
  many of its examples are (leave-one-out) closer to them than to their own class.

All of it works on one :class:`snapshot.ExampleSnapshot` of the namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fewshot_common.vectors import l2_normalize

from .open_set import leave_one_out_scores

if TYPE_CHECKING:
    from .snapshot import ExampleSnapshot

# Shipped model on dev images: the same file 1.0, a JPEG q70 re-encode >= 0.98 (median 0.994),
# while the closest two distinct images of the 2,500 reach 0.90.
DEFAULT_DUPLICATE_SIMILARITY = 0.98


@dataclass(frozen=True)
class ExampleQuality:
    example_id: str
    consistency: float | None  # LOO cosine to its own class; None when it is the class's only one
    nearest_other_label: str | None  # the closest other class, None in a one-class namespace
    nearest_other_score: float | None

    @property
    def likely_mislabel(self) -> bool:
        return (
            self.consistency is not None
            and self.nearest_other_score is not None
            and self.nearest_other_score > self.consistency
        )


@dataclass(frozen=True)
class ShotWarning:
    example_id: str
    kind: Literal["likely_mislabel", "near_duplicate"]
    other: str  # the closer class (likely_mislabel) or the duplicated example id (near_duplicate)
    similarity: float  # cosine to that class's prototype / to that example
    message: str


@dataclass(frozen=True)
class Confusion:
    label: str
    prototype_similarity: float  # cosine between the two prototypes
    examples_closer: int  # examples of the class closer (LOO) to this class than to their own


def _class_index(snapshot: ExampleSnapshot, label: str) -> int:
    return snapshot.labels.index(label)


def example_quality(snapshot: ExampleSnapshot, label: str) -> list[ExampleQuality]:
    """Every fetched example of ``label`` (which must be in the snapshot), in id order."""
    c = _class_index(snapshot, label)
    vectors = snapshot.embeddings[c]
    only_mine = [v if i == c else v[:0] for i, v in enumerate(snapshot.embeddings)]
    scores = leave_one_out_scores(snapshot.means, snapshot.counts, only_mine).scores
    others = np.delete(np.arange(len(snapshot.labels)), c)
    qualities = []
    for row, example_id in enumerate(snapshot.example_ids[c]):
        consistency = float(scores[row, c]) if len(scores) else None
        if len(others):
            own_row = scores[row] if len(scores) else vectors[row] @ l2_normalize(snapshot.means).T
            nearest = int(others[np.argmax(own_row[others])])
            nearest_label, nearest_score = snapshot.labels[nearest], float(own_row[nearest])
        else:
            nearest_label, nearest_score = None, None
        qualities.append(ExampleQuality(example_id, consistency, nearest_label, nearest_score))
    return qualities


def add_warnings(
    snapshot: ExampleSnapshot, label: str, added_ids: list[str], duplicate_similarity: float
) -> list[ShotWarning]:
    """Warnings for the examples ``added_ids`` of ``label`` (already stored), in request order."""
    c = _class_index(snapshot, label)
    ids = snapshot.example_ids[c]
    row_of = {example_id: row for row, example_id in enumerate(ids)}
    quality = {q.example_id: q for q in example_quality(snapshot, label)}
    vectors = snapshot.embeddings[c]
    warnings: list[ShotWarning] = []
    later = set(added_ids)
    for example_id in added_ids:
        later.discard(example_id)
        if example_id not in row_of:  # deleted meanwhile by another request
            continue
        q = quality[example_id]
        if q.likely_mislabel:
            warnings.append(
                ShotWarning(
                    example_id,
                    "likely_mislabel",
                    q.nearest_other_label or "",
                    q.nearest_other_score or 0.0,
                    f"example {example_id} is closer to class {q.nearest_other_label!r} "
                    f"({q.nearest_other_score:.3f}) than to {label!r} without it ({q.consistency:.3f})",
                )
            )
        # Compared with the examples before it: those already stored and earlier ones of this add.
        earlier = [row for other, row in row_of.items() if other != example_id and other not in later]
        if earlier:
            similarities = vectors[earlier] @ vectors[row_of[example_id]]
            best = int(np.argmax(similarities))
            if similarities[best] >= duplicate_similarity:
                twin = ids[earlier[best]]
                warnings.append(
                    ShotWarning(
                        example_id,
                        "near_duplicate",
                        twin,
                        float(similarities[best]),
                        f"example {example_id} nearly duplicates example {twin} of {label!r} "
                        f"(cosine {similarities[best]:.4f}); it counts twice in the prototype",
                    )
                )
    return warnings


def confusions(snapshot: ExampleSnapshot, label: str, top_k: int) -> list[Confusion]:
    """The ``top_k`` other classes most similar to ``label``, most similar first."""
    c = _class_index(snapshot, label)
    prototypes = l2_normalize(snapshot.means.astype(np.float64))
    similarity = prototypes @ prototypes[c]
    closer = np.zeros(len(snapshot.labels), dtype=np.int64)
    only_mine = [v if i == c else v[:0] for i, v in enumerate(snapshot.embeddings)]
    scores = leave_one_out_scores(snapshot.means, snapshot.counts, only_mine).scores
    for row in scores:
        closer += row > row[c]
    others = [i for i in np.argsort(-similarity, kind="stable") if i != c][:top_k]
    return [Confusion(snapshot.labels[i], float(similarity[i]), int(closer[i])) for i in others]
