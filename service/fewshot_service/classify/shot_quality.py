"""Shot quality: how well each example of a class fits it, judged leave-one-out.

- an example is a **likely mislabel** when another class's prototype is closer to it than its own
  class's prototype without it (``(sum_c - e) / (n_c - 1)``);
- a new example is a **near duplicate** when its cosine similarity to an example already in the
  class (or added before it in the same request) is at least ``duplicate_similarity``: the same
  image twice would count twice in the prototype;
- a class's **confusions** are the classes whose prototypes are most similar to its own, with how
  many of its examples are (leave-one-out) closer to them than to their own class.

The changed class's own side (consistency, duplicates) comes from its examples in an
:class:`snapshot.ExampleSnapshot`. The other classes' side (nearest other class, most similar
prototypes) comes either from the same snapshot holding every prototype, or, given ``others``
(the replica's synced :class:`PrototypeMatrix`), from a top-k against that matrix: O(class + k)
per call instead of a read of the whole namespace (docs/open-set.md, "Where the warnings'
other classes come from").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fewshot_common.vectors import l2_normalize

from .open_set import leave_one_out_scores

if TYPE_CHECKING:
    from .prototypes import PrototypeMatrix
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
    # The earlier example (id order) it nearly duplicates, when asked with duplicate_similarity.
    near_duplicate_of: str | None = None

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


def _nearest_others(
    others: PrototypeMatrix, label: str, vectors: np.ndarray
) -> list[tuple[str | None, float | None]]:
    """Per row of ``vectors``: the closest class of ``others`` but ``label``, and its score
    (a top-2, kept by the matrix for ``label`` while only other classes change)."""
    return others.nearest_others(label, vectors)


def example_quality(
    snapshot: ExampleSnapshot,
    label: str,
    others: PrototypeMatrix | None = None,
    duplicate_similarity: float | None = None,
) -> list[ExampleQuality]:
    """Every fetched example of ``label`` (which must be in the snapshot), in id order.

    With ``others``, the nearest other class comes from that matrix and the snapshot need only
    hold ``label``; without, from the snapshot's prototypes (it must hold every class). With
    ``duplicate_similarity``, each example also names the earlier one it nearly duplicates."""
    c = _class_index(snapshot, label)
    vectors = snapshot.embeddings[c]
    only_mine = [v if i == c else v[:0] for i, v in enumerate(snapshot.embeddings)]
    scores = leave_one_out_scores(snapshot.means, snapshot.counts, only_mine).scores
    from_matrix = _nearest_others(others, label, vectors) if others is not None else None
    others_in_snapshot = np.delete(np.arange(len(snapshot.labels)), c)
    qualities = []
    for row, example_id in enumerate(snapshot.example_ids[c]):
        consistency = float(scores[row, c]) if len(scores) else None
        if from_matrix is not None:
            nearest_label, nearest_score = from_matrix[row]
        elif len(others_in_snapshot):
            own_row = scores[row] if len(scores) else vectors[row] @ l2_normalize(snapshot.means).T
            nearest = int(others_in_snapshot[np.argmax(own_row[others_in_snapshot])])
            nearest_label, nearest_score = snapshot.labels[nearest], float(own_row[nearest])
        else:
            nearest_label, nearest_score = None, None
        qualities.append(ExampleQuality(example_id, consistency, nearest_label, nearest_score))
    if duplicate_similarity is not None:
        twins = near_duplicates(vectors, duplicate_similarity)
        ids = snapshot.example_ids[c]
        qualities = [
            dataclasses.replace(q, near_duplicate_of=ids[t]) if t is not None else q
            for q, t in zip(qualities, twins)
        ]
    return qualities


# Rows of the similarity matrix computed at a time: a class at its cap never needs n x n floats.
_DUPLICATE_BLOCK = 256


def near_duplicates(vectors: np.ndarray, duplicate_similarity: float) -> list[int | None]:
    """Per row of ``vectors`` (unit rows, in id order): the most similar *earlier* row when
    their cosine is at least ``duplicate_similarity``, else None. The first of a pair is not
    flagged: deleting the later one leaves the class as it was before the duplicate came."""
    n = len(vectors)
    twins: list[int | None] = [None] * n
    for start in range(1, n, _DUPLICATE_BLOCK):
        block = vectors[start : start + _DUPLICATE_BLOCK] @ vectors[: start + _DUPLICATE_BLOCK].T
        for offset, row in enumerate(block):
            earlier = row[: start + offset]
            best = int(np.argmax(earlier))
            if earlier[best] >= duplicate_similarity:
                twins[start + offset] = best
    return twins


def add_warnings(
    snapshot: ExampleSnapshot,
    label: str,
    added_ids: list[str],
    duplicate_similarity: float,
    others: PrototypeMatrix | None = None,
) -> list[ShotWarning]:
    """Warnings for the examples ``added_ids`` of ``label`` (already stored), in request order
    (``others``: as for :func:`example_quality`)."""
    c = _class_index(snapshot, label)
    ids = snapshot.example_ids[c]
    row_of = {example_id: row for row, example_id in enumerate(ids)}
    quality = {q.example_id: q for q in example_quality(snapshot, label, others)}
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


def confusions(
    snapshot: ExampleSnapshot, label: str, top_k: int, others: PrototypeMatrix | None = None
) -> list[Confusion]:
    """The ``top_k`` other classes most similar to ``label``, most similar first (``others``:
    as for :func:`example_quality`; its top-k against ``label``'s prototype picks them)."""
    c = _class_index(snapshot, label)
    only_mine = [v if i == c else v[:0] for i, v in enumerate(snapshot.embeddings)]
    loo = leave_one_out_scores(snapshot.means, snapshot.counts, only_mine).scores
    if others is not None:
        query = l2_normalize(snapshot.means[c : c + 1].astype(np.float64)).astype(np.float32)
        best = others.top_k(query, top_k + 1)[0] if len(others) else []
        picked = [p for p in best if p.label != label][:top_k]
        found = []
        for p in picked:
            row = others.unit_row(p.label)
            closer = 0
            if row is not None and len(loo):
                vectors = snapshot.embeddings[c].astype(np.float64)
                closer = int(np.sum(vectors @ row.astype(np.float64) > loo[:, c]))
            found.append(Confusion(p.label, p.score, closer))
        return found
    prototypes = l2_normalize(snapshot.means.astype(np.float64))
    similarity = prototypes @ prototypes[c]
    closer = np.zeros(len(snapshot.labels), dtype=np.int64)
    for row in loo:
        closer += row > row[c]
    indices = [i for i in np.argsort(-similarity, kind="stable") if i != c][:top_k]
    return [Confusion(snapshot.labels[i], float(similarity[i]), int(closer[i])) for i in indices]
