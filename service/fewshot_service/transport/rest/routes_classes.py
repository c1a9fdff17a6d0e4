"""/v1/classes: a namespace's classes and their example images.

Labels may contain ``/``. Routes are matched on the raw (still percent-encoded) path (see
:class:`middleware.RawClassPath`), so a client that encodes ``/`` as ``%2F`` never collides with
the ``/examples`` or ``/confusions`` suffix; an unencoded ``/`` works too unless the label itself
ends in ``/examples``, ``/examples/<id>``, ``/examples/<id>/image`` or ``/confusions``. Handlers percent-decode path parameters themselves, once.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from ...core.class_pages import MAX_PAGE_SIZE, MAX_QUERY_CHARS
from ...core.example_images import MAX_THUMBNAIL, MIN_THUMBNAIL, check_size
from ...names import MAX_NAME_CHARS, resolve_namespace
from ..access import Action
from .dependencies import (
    IMAGE_UPLOAD_OPENAPI,
    Core,
    Images,
    Namespace,
    RequestCancellation,
    StrictQuery,
    TopK,
    decode_path_param,
)
from .schemas import (
    AddedBody,
    ClassDetailBody,
    ClassListBody,
    ClassSummaryBody,
    ConfusionBody,
    ConfusionsBody,
    DeletedClassBody,
    DeletedExampleBody,
    ExampleQualityBody,
    ShotWarningBody,
    error_responses,
)
from .security import require

router = APIRouter(prefix="/v1/classes", tags=["classes"], dependencies=[StrictQuery])

# Described for the schema (lengths of the percent-decoded value); the core checks them.
Label = Annotated[
    str,
    Path(
        description="the class label (encode `/` as `%2F`)",
        json_schema_extra={"minLength": 1, "maxLength": MAX_NAME_CHARS},
    ),
]
PageSize = Annotated[
    int,
    Query(
        description=f"classes per page (0: the default, {MAX_PAGE_SIZE})",
        json_schema_extra={"minimum": 0, "maximum": MAX_PAGE_SIZE},
    ),
]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the page before (opaque)")]
Search = Annotated[
    str | None,
    Query(
        description="only classes whose label contains this (case-insensitive)",
        json_schema_extra={"maxLength": MAX_QUERY_CHARS},
    ),
]
ExampleId = Annotated[
    str,
    Path(
        description="an example id, as returned on upload",
        json_schema_extra={"minLength": 1, "maxLength": MAX_NAME_CHARS},
    ),
]


@router.post(
    "/{label:path}/examples",
    status_code=201,
    response_model=AddedBody,
    responses=error_responses(400, 401, 403, 409, 413, 422, 503),
    dependencies=[require(Action.ADD)],
    openapi_extra=IMAGE_UPLOAD_OPENAPI,
    summary="Add one or more example images to a class (created on first use)",
)
def add_examples(
    label: Label,
    images: Images,
    core: Core,
    cancellation: RequestCancellation,
    namespace: Namespace = None,
) -> AddedBody:
    label = decode_path_param(label, "label")
    info = core.add_examples(namespace, label, images.contents, cancellation)
    return AddedBody(
        namespace=resolve_namespace(namespace),
        label=info.label,
        count=info.count,
        example_ids=info.example_ids,
        added_example_ids=info.added_example_ids,
        model_id=core.model_id,
        warnings=[ShotWarningBody(**dataclasses.asdict(w)) for w in info.warnings],
    )


@router.get(
    "",
    response_model=ClassListBody,
    responses=error_responses(401, 403, 422, 503),
    dependencies=[require(Action.LIST)],
    summary="A page of the namespace's classes by label; follow next_cursor for the rest",
)
def list_classes(
    core: Core, namespace: Namespace = None, limit: PageSize = 0, cursor: Cursor = None, q: Search = None
) -> ClassListBody:
    summaries, next_cursor = core.list_classes_page(namespace, limit, cursor, q)
    return ClassListBody(
        namespace=resolve_namespace(namespace),
        classes=[ClassSummaryBody(label=s.label, count=s.count) for s in summaries],
        next_cursor=next_cursor,
    )


# Declared before GET /v1/classes/{label}: a raw path ending in /confusions asks for these.
@router.get(
    "/{label:path}/confusions",
    response_model=ConfusionsBody,
    responses=error_responses(401, 403, 404, 422, 503),
    dependencies=[require(Action.GET)],
    summary="The classes this class is most easily confused with (most similar prototypes first)",
)
def get_confusions(label: Label, core: Core, namespace: Namespace = None, top_k: TopK = 0) -> ConfusionsBody:
    label = decode_path_param(label, "label")
    found = core.class_confusions(namespace, label, top_k)
    return ConfusionsBody(
        namespace=resolve_namespace(namespace),
        label=label,
        confusions=[ConfusionBody(**dataclasses.asdict(c)) for c in found],
    )


ThumbnailSize = Annotated[
    int | None,
    Query(
        description="longest side in pixels of a thumbnail made from the stored copy (never enlarged; "
        "absent: the stored copy as it is)",
        json_schema_extra={"minimum": MIN_THUMBNAIL, "maximum": MAX_THUMBNAIL},
    ),
]
# The id of an example is reused after its namespace is deleted (ids restart), so the same URL
# may later name other bytes: browsers keep the image but ask again (If-None-Match -> 304).
IMAGE_CACHE_CONTROL = "private, no-cache"
IMAGE_OPENAPI = {
    "responses": {
        "200": {
            "description": "the stored image (JPEG or PNG), or a thumbnail of it in the same format",
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("image/jpeg", "image/png")
            },
        },
        "304": {"description": "not modified (If-None-Match holds the ETag)"},
    }
}


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


# Declared before GET /v1/classes/{label}: a raw path ending in /examples/<id>/image is an image.
@router.get(
    "/{label:path}/examples/{example_id}/image",
    response_class=Response,
    responses=error_responses(401, 403, 404, 409, 422, 503),
    dependencies=[require(Action.GET)],
    openapi_extra=IMAGE_OPENAPI,
    summary="The stored (reduced, metadata-free) copy of an example's image, or a thumbnail of it",
)
def get_example_image(
    label: Label,
    example_id: ExampleId,
    core: Core,
    namespace: Namespace = None,
    size: ThumbnailSize = None,
    if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    label = decode_path_param(label, "label")
    example_id = decode_path_param(example_id, "example id")
    size = check_size(size)
    stored = core.example_image(namespace, label, example_id)
    etag = stored.etag(size)
    headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL, "Vary": "Authorization"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(core.thumbnails.of(stored, size), media_type=stored.media_type, headers=headers)


@router.get(
    "/{label:path}",
    response_model=ClassDetailBody,
    responses=error_responses(401, 403, 404, 422, 503),
    dependencies=[require(Action.GET)],
    summary="A class's examples, each with its consistency with the class (leave-one-out)",
)
def get_class(label: Label, core: Core, namespace: Namespace = None) -> ClassDetailBody:
    info = core.get_class(namespace, decode_path_param(label, "label"))
    return ClassDetailBody(
        namespace=resolve_namespace(namespace),
        label=info.label,
        count=info.count,
        example_ids=info.example_ids,
        examples=[
            ExampleQualityBody(**dataclasses.asdict(q), likely_mislabel=q.likely_mislabel)
            for q in info.examples
        ],
    )


# Declared before DELETE /v1/classes/{label}: a raw path ending in /examples/<id> is an example.
@router.delete(
    "/{label:path}/examples/{example_id}",
    response_model=DeletedExampleBody,
    responses=error_responses(401, 403, 404, 422, 503),
    dependencies=[require(Action.DELETE)],
    summary="Remove one example; removing the last one removes the class",
)
def delete_example(
    label: Label, example_id: ExampleId, core: Core, namespace: Namespace = None
) -> DeletedExampleBody:
    label = decode_path_param(label, "label")
    example_id = decode_path_param(example_id, "example id")
    info = core.delete_example(namespace, label, example_id)
    return DeletedExampleBody(
        namespace=resolve_namespace(namespace),
        label=label,
        example_id=example_id,
        count=info.count if info else 0,
        example_ids=info.example_ids if info else [],
        class_deleted=info is None,
    )


@router.delete(
    "/{label:path}",
    response_model=DeletedClassBody,
    responses=error_responses(401, 403, 404, 422, 503),
    dependencies=[require(Action.DELETE)],
)
def delete_class(label: Label, core: Core, namespace: Namespace = None) -> DeletedClassBody:
    label = decode_path_param(label, "label")
    core.delete_class(namespace, label)
    return DeletedClassBody(namespace=resolve_namespace(namespace), label=label)
