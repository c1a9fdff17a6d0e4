"""What the client's calls return: plain dataclasses, independent of the server's modules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # cosine similarity to the class prototype
    # Estimated P(label is right): its share of one distribution over the namespace's classes and
    # "unknown" (the confidences of an image's predictions and its unknown_probability sum to <= 1).
    confidence: float | None = None


@dataclass(frozen=True)
class ClassifyResult:
    """One image's answer: its top classes, best first, whether it matches none of them, and the
    probability of that in the same distribution as the predictions' confidences.

    Iterating or indexing it walks ``predictions``, so ``client.classify(x)[0][0].label`` reads
    the best label as it did when classify returned plain lists.
    """

    predictions: list[Prediction]
    unknown: bool = False
    unknown_probability: float | None = None  # None from a server older than this field

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    def __getitem__(self, index: int) -> Prediction:
        return self.predictions[index]

    def __len__(self) -> int:
        return len(self.predictions)


@dataclass(frozen=True)
class ClassSummary:
    label: str
    count: int


@dataclass(frozen=True)
class ClassInfo:
    namespace: str
    label: str
    count: int
    example_ids: list[str]
    added_example_ids: list[str] = field(default_factory=list)  # add_examples only
    warnings: list[dict] = field(default_factory=list)  # add_examples: likely mislabels, duplicates


@dataclass(frozen=True)
class ModelCompleteness:
    model_id: str
    embedded: int  # examples of the namespace this model has an embedding of
    complete: bool


@dataclass(frozen=True)
class NamespaceInfo:
    namespace: str
    class_count: int
    example_count: int
    model_id: str | None  # the model with the most embeddings here
    models: list[ModelCompleteness] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    served_here: bool  # the model the answering server runs
    namespaces: int
    complete_namespaces: int
    embeddings: int


@dataclass(frozen=True)
class DroppedModel:
    model_id: str
    dropped_embeddings: int
    namespaces: list[str]


@dataclass(frozen=True)
class DeletedNamespace:
    namespace: str
    deleted_classes: int
    deleted_examples: int


@dataclass
class BulkClassResult:
    """One class's part of :meth:`FewShotClient.add_examples_bulk`, over all its requests."""

    label: str
    count: int  # the class's examples after the last request that named it
    added_example_ids: list[str] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (upload index, example holding its bytes)
    warnings: list[dict] = field(default_factory=list)  # likely mislabels, near duplicates
    error: str | None = None  # a request refused this class (e.g. at its cap)


@dataclass
class BulkAdded:
    namespace: str
    added: int
    skipped: int
    classes: list[BulkClassResult]  # in order of first appearance


@dataclass(frozen=True)
class ClassJudgement:
    """One class of :class:`NamespaceReport`, judged leave-one-out on its own examples."""

    label: str
    count: int
    loo_accuracy: float | None  # None: fewer than two examples
    nearest_label: str | None  # the class with the closest prototype
    nearest_similarity: float | None
    needs: list[str] = field(default_factory=list)  # "more_shots", "cleaner_shots"
    suspect_example_ids: list[str] = field(default_factory=list)  # likely mislabels


@dataclass(frozen=True)
class ConfusedPair:
    a: str
    b: str
    similarity: float  # cosine between the two prototypes
    a_as_b: int  # examples of a classified (leave-one-out) as b
    b_as_a: int


@dataclass(frozen=True)
class NamespaceReport:
    """GET /v1/report: will the namespace's classes work (docs/api.md, "Report")."""

    namespace: str
    model_id: str
    classes: int
    examples: int
    sampled: bool  # only some classes or examples were judged (the server bounds the work)
    judged_examples: int
    expected_accuracy: float | None  # leave-one-out accuracy over the judged examples
    per_class: list[ClassJudgement]  # lowest loo_accuracy first
    confused_pairs: list[ConfusedPair]
