"""/v1/classify: the top classes of a namespace for each uploaded image."""

from __future__ import annotations

from fastapi import APIRouter

from ...classify.open_set import resolve_unknown_rate
from ...names import resolve_namespace
from ..access import Action
from .dependencies import (
    IMAGE_UPLOAD_OPENAPI,
    Core,
    Images,
    Namespace,
    RequestCancellation,
    StrictQuery,
    TopK,
    UnknownRate,
)
from .schemas import ClassifyBody, PredictionBody, error_responses
from .security import require

router = APIRouter(tags=["classify"], dependencies=[StrictQuery])


@router.post(
    "/v1/classify",
    response_model=ClassifyBody,
    responses=error_responses(400, 401, 403, 409, 413, 422, 503),
    dependencies=[require(Action.CLASSIFY)],
    openapi_extra=IMAGE_UPLOAD_OPENAPI,
    summary="Classify images against a namespace's classes (score = cosine similarity); "
    "flag the ones that match none (unknown)",
)
def classify(
    images: Images,
    core: Core,
    cancellation: RequestCancellation,
    namespace: Namespace = None,
    top_k: TopK = 0,
    unknown_rate: UnknownRate = 0,
) -> ClassifyBody:
    results = core.classify_open_set(images.contents, namespace, top_k, unknown_rate, cancellation)
    return ClassifyBody(
        namespace=resolve_namespace(namespace),
        model_id=core.model_id,
        results=[
            [PredictionBody(label=p.label, score=p.score, confidence=p.confidence) for p in r.predictions]
            for r in results
        ],
        unknown=[r.unknown for r in results],
        unknown_probability=[r.unknown_probability for r in results],
        unknown_rate=resolve_unknown_rate(unknown_rate, core.unknown_rate),
    )
