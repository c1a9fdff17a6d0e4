"""Request and response bodies of the REST API; they also document it at /docs and /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    error: str
    message: str
    file: str | None = None  # an image error: the uploaded file's name ...
    index: int | None = None  # ... and its 0-based position in the request
    request_id: str | None = None  # a server-side failure: the id its log lines carry


class ClassSummaryBody(BaseModel):
    label: str
    count: int


class ClassListBody(BaseModel):
    namespace: str
    classes: list[ClassSummaryBody]


class ClassBody(BaseModel):
    namespace: str
    label: str
    count: int
    example_ids: list[str]


class AddedBody(ClassBody):
    added_example_ids: list[str]
    model_id: str


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


class PredictionBody(BaseModel):
    label: str
    score: float


class ClassifyBody(BaseModel):
    namespace: str
    model_id: str
    results: list[list[PredictionBody]]


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
    preprocess: PreprocessBody
    license: str | None  # the model's licence statement; None when the model states none


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses an operation can answer with."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


ERROR_DESCRIPTIONS = {
    400: "malformed request body (e.g. broken multipart data)",
    401: "missing or unknown API key (the server has --api-keys)",
    403: "the API key's role or namespaces do not allow this, or a cross-origin change",
    404: "unknown class or example",
    409: "failed precondition: no classes yet, or another model's namespace",
    413: "a limit was exceeded",
    422: "bad input",
    500: "unexpected server error",
    503: "Redis unavailable",
}
