"""/v1/namespaces: which namespaces hold classes, and deleting one with everything in it.

A namespace appears in the path percent-encoded (``%2F`` for ``/``); it is routed on the raw path
(:class:`middleware.RawClassPath`) and decoded strictly once, here and in :func:`require`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from ...names import MAX_NAME_CHARS
from ..access import Action, Principal
from .dependencies import Core, StrictQuery, decode_path_param
from .schemas import (
    DeletedNamespaceBody,
    ModelCompletenessBody,
    NamespaceListBody,
    NamespaceSummaryBody,
    error_responses,
)
from .security import require

router = APIRouter(prefix="/v1/namespaces", tags=["namespaces"], dependencies=[StrictQuery])

NamespaceName = Annotated[
    str,
    Path(
        description="the namespace (encode `/` as `%2F`)",
        json_schema_extra={"minLength": 1, "maxLength": MAX_NAME_CHARS},
    ),
]
Caller = Annotated[Principal, require(Action.LIST_NAMESPACES)]


@router.get(
    "",
    response_model=NamespaceListBody,
    responses=error_responses(401, 422, 503),
    summary="The namespaces holding classes (those this API key may use), with their counts and "
    "each model's completeness",
)
def list_namespaces(core: Core, caller: Caller) -> NamespaceListBody:
    return NamespaceListBody(
        namespaces=[
            NamespaceSummaryBody(
                namespace=n.name,
                class_count=n.class_count,
                example_count=n.example_count,
                model_id=n.model_id,
                models=[
                    ModelCompletenessBody(model_id=m.model_id, embedded=m.embedded, complete=m.complete)
                    for m in n.models
                ],
            )
            for n in core.list_namespaces()
            if caller.may_use(n.name)
        ]
    )


@router.delete(
    "/{namespace:path}",
    response_model=DeletedNamespaceBody,
    responses=error_responses(401, 403, 404, 422, 503),
    dependencies=[require(Action.DELETE, namespace_in_path=True)],
    summary="Delete a namespace: every class and example in it, atomically",
)
def delete_namespace(namespace: NamespaceName, core: Core) -> DeletedNamespaceBody:
    deleted = core.delete_namespace(decode_path_param(namespace, "namespace"))
    return DeletedNamespaceBody(
        namespace=deleted.name,
        deleted_classes=deleted.class_count,
        deleted_examples=deleted.example_count,
    )
