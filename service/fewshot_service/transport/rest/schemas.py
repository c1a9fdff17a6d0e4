"""Request and response bodies of the REST API; they also document it at /docs and /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ModelProgressBody(BaseModel):
    """A 409 while this server's model has not embedded every example of the namespace yet."""

    model_id: str  # the model this server runs
    embedded: int  # examples it has an embedding of
    total: int  # examples the namespace holds
    without_image: int  # missing examples with no stored image: only a re-upload helps them
    backfilling: bool  # the rest is being computed from stored images: retry shortly


class ErrorBody(BaseModel):
    error: str
    message: str
    file: str | None = None  # an image error: the uploaded file's name ...
    index: int | None = None  # ... and its 0-based position in the request
    request_id: str | None = None  # a server-side failure: the id its log lines carry
    progress: ModelProgressBody | None = None  # a model roll in progress (409)


class ClassSummaryBody(BaseModel):
    label: str
    count: int


class ClassListBody(BaseModel):
    namespace: str
    classes: list[ClassSummaryBody]  # one page, by label
    # Pass as ``cursor`` for the next page; null on the last page.
    next_cursor: str | None = None


class ClassBody(BaseModel):
    namespace: str
    label: str
    count: int
    example_ids: list[str]


class ExampleQualityBody(BaseModel):
    example_id: str
    # Leave-one-out cosine to its own class (the class without it); null for a class's only example.
    consistency: float | None
    nearest_other_label: str | None  # the closest other class; null in a one-class namespace
    nearest_other_score: float | None
    likely_mislabel: bool  # the other class is closer than its own
    # The earlier example (by id) this one nearly duplicates (cosine >= the server's threshold).
    near_duplicate_of: str | None = None


class ClassDetailBody(ClassBody):
    examples: list[ExampleQualityBody]


class ShotWarningBody(BaseModel):
    example_id: str
    kind: str  # likely_mislabel | near_duplicate
    other: str  # the closer class, or the example it duplicates
    similarity: float
    message: str


class ConfusionBody(BaseModel):
    label: str
    prototype_similarity: float  # cosine between the two classes' prototypes
    examples_closer: int  # examples of the class closer (leave-one-out) to this one than to their own


class ConfusionsBody(BaseModel):
    namespace: str
    label: str
    confusions: list[ConfusionBody]


class AddedBody(ClassBody):
    added_example_ids: list[str]
    model_id: str
    warnings: list[ShotWarningBody] = []  # per added example: likely mislabel, near duplicate


class SkippedExampleBody(BaseModel):
    index: int  # the upload's position in the request
    example_id: str  # the example of the class that already holds these bytes (sha256)


class BulkClassBody(BaseModel):
    label: str
    count: int  # the class's examples after this request
    added_example_ids: list[str]
    skipped: list[SkippedExampleBody] = []  # uploads whose bytes the class already held
    warnings: list[ShotWarningBody] = []  # as a single add's: likely mislabel, near duplicate
    error: str | None = None  # this class was refused (e.g. at its cap): none of its uploads added


class BulkAddedBody(BaseModel):
    namespace: str
    model_id: str
    added: int
    skipped: int
    classes: list[BulkClassBody]  # in order of first appearance in the request


class DeletedClassBody(BaseModel):
    namespace: str
    label: str
    deleted: bool = True


class DeletedExampleBody(BaseModel):
    namespace: str
    label: str
    example_id: str
    count: int
    example_ids: list[str]
    class_deleted: bool


class ModelCompletenessBody(BaseModel):
    model_id: str
    embedded: int  # examples of the namespace this model has an embedding of
    complete: bool  # embedded == example_count: servers of this model can classify here


class NamespaceSummaryBody(BaseModel):
    namespace: str
    class_count: int
    example_count: int
    model_id: str | None  # the model with the most embeddings here (see models)
    models: list[ModelCompletenessBody] = []  # every model holding embeddings, most first


class ModelSummaryBody(BaseModel):
    model_id: str
    served_here: bool  # the model this server runs
    namespaces: int  # namespaces (of this key) holding its embeddings
    complete_namespaces: int  # of those, the ones it has fully embedded
    embeddings: int  # its embeddings in them


class ModelListBody(BaseModel):
    models: list[ModelSummaryBody]


class DroppedModelBody(BaseModel):
    model_id: str
    dropped_embeddings: int
    namespaces: list[str]  # where it held embeddings (among those the key may use)


class NamespaceListBody(BaseModel):
    namespaces: list[NamespaceSummaryBody]  # only those the API key may use, by name


class DeletedNamespaceBody(BaseModel):
    namespace: str
    deleted_classes: int
    deleted_examples: int


class PredictionBody(BaseModel):
    label: str
    score: float
    # Estimated P(label is right): its share of one softmax over the classes and "unknown".
    confidence: float | None = None


class ClassifyBody(BaseModel):
    namespace: str
    model_id: str
    results: list[list[PredictionBody]]
    # Per image, parallel to results: it matches none of the classes well enough.
    unknown: list[bool] = []
    unknown_rate: float | None = None  # the rate the unknown flags were calibrated for
    # Per image, parallel to results: P(none of the classes), in the same distribution as the
    # confidences (they and this sum to <= 1); unknown is true exactly when it outweighs every class.
    unknown_probability: list[float] = []


class ClassJudgementBody(BaseModel):
    label: str
    count: int  # the class's examples
    loo_accuracy: float | None  # its judged examples classified as it, leave-one-out; null below 2
    nearest_label: str | None  # the class with the closest prototype; null with one class
    nearest_similarity: float | None  # cosine between the two prototypes
    needs: list[Literal["more_shots", "cleaner_shots"]]
    suspect_example_ids: list[str]  # likely mislabels: another class is closer than its own


class ConfusedPairBody(BaseModel):
    a: str
    b: str
    similarity: float  # cosine between the two prototypes
    a_as_b: int  # judged examples of a classified as b, leave-one-out
    b_as_a: int


class ReportBody(BaseModel):
    namespace: str
    model_id: str
    classes: int
    examples: int
    # Only some classes or examples were judged (a bounded sample: docs/api.md, "Report").
    sampled: bool
    judged_examples: int
    # Leave-one-out accuracy over the judged examples; null when no class has two examples.
    expected_accuracy: float | None
    per_class: list[ClassJudgementBody]  # the judged classes, lowest loo_accuracy first
    confused_pairs: list[ConfusedPairBody]  # most confusions first, then most similar


class HealthBody(BaseModel):
    status: str


class ReadyBody(BaseModel):
    ready: bool
    model_loaded: bool
    model_id: str
    redis: bool


class EmbedBody(BaseModel):
    model_id: str
    dim: int
    embeddings: list[list[float]]  # one L2-normalised vector per uploaded image, in order


class PreprocessBody(BaseModel):
    input_size: int
    resize_size: int
    interpolation: str
    mean: list[float]
    std: list[float]


class InfoBody(BaseModel):
    version: str  # the server's (fewshot) version
    model_id: str
    arch: str
    embedding_dim: int
    precision: str
    # What runs the model, e.g. "onnxruntime CPUExecutionProvider" or "openvino CPU (bf16)".
    engine: str
    preprocess: PreprocessBody
    license: str | None  # the model's licence statement; None when the model states none


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses an operation can answer with."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


ERROR_DESCRIPTIONS = {
    400: "malformed request body (e.g. broken multipart data)",
    401: "missing or unknown API key (the server has --api-keys)",
    403: "the API key's role or namespaces do not allow this, or a cross-origin change",
    404: "unknown class, example or namespace",
    409: "failed precondition: no classes yet, a class at its cap, or this server's model has "
    "not embedded every example yet (body: progress)",
    413: "a limit was exceeded",
    422: "bad input",
    500: "unexpected server error",
    503: "Redis unavailable",
}
