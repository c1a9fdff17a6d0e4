"""POST /v1/examples:bulk: many classes' examples in one request (``fewshot import``).

A multipart body with the image parts ``files`` and, parallel to them, one form field ``labels``
per file (the i-th ``labels`` value is the class of the i-th file). Labels travel as form values,
not in the path, so any label (``/`` included) needs no encoding beyond multipart's own.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Form

from ...names import MAX_NAME_CHARS, resolve_namespace
from ..access import Action
from .dependencies import (
    IMAGE_UPLOAD_OPENAPI,
    Core,
    Images,
    Namespace,
    RequestCancellation,
    StrictQuery,
)
from .schemas import (
    BulkAddedBody,
    BulkClassBody,
    ShotWarningBody,
    SkippedExampleBody,
    error_responses,
)
from .security import require

router = APIRouter(prefix="/v1", tags=["classes"], dependencies=[StrictQuery])

Labels = Annotated[
    list[str],
    Form(
        description="the class of each file, in the order of the files (one `labels` field per file)",
        min_length=1,
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS}},
    ),
]


@router.post(
    "/examples:bulk",
    status_code=200,
    response_model=BulkAddedBody,
    responses=error_responses(400, 401, 403, 409, 413, 422, 503),
    dependencies=[require(Action.ADD)],
    openapi_extra=IMAGE_UPLOAD_OPENAPI,
    summary="Add examples to many classes at once; uploads a class already holds are skipped",
)
def add_examples_bulk(
    images: Images,
    labels: Labels,
    core: Core,
    cancellation: RequestCancellation,
    namespace: Namespace = None,
) -> BulkAddedBody:
    report = core.add_examples_bulk(namespace, labels, images.contents, cancellation)
    return BulkAddedBody(
        namespace=resolve_namespace(namespace),
        model_id=core.model_id,
        added=report.added,
        skipped=report.skipped,
        classes=[
            BulkClassBody(
                label=c.label,
                count=c.count,
                added_example_ids=c.added_example_ids,
                skipped=[SkippedExampleBody(index=s.index, example_id=s.example_id) for s in c.skipped],
                warnings=[ShotWarningBody(**dataclasses.asdict(w)) for w in c.warnings],
                error=c.error,
            )
            for c in report.classes
        ],
    )
