"""/v1/models: which models hold embeddings (in the namespaces this API key may use), and dropping
the embeddings of a model no server runs any more (a finished model roll).

A model id appears in the path percent-encoded, decoded strictly once here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from ...names import MAX_NAME_CHARS
from ..access import Action, Principal
from .dependencies import Core, StrictQuery, decode_path_param
from .schemas import DroppedModelBody, ModelListBody, ModelSummaryBody, error_responses
from .security import require

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[StrictQuery])

ModelId = Annotated[
    str,
    Path(
        description="the model id (as /v1/info and /v1/namespaces show it)",
        json_schema_extra={"minLength": 1, "maxLength": MAX_NAME_CHARS},
    ),
]


@router.get(
    "",
    response_model=ModelListBody,
    responses=error_responses(401, 422, 503),
    summary="The models holding embeddings in this API key's namespaces, and how complete each is",
)
def list_models(core: Core, caller: Annotated[Principal, require(Action.LIST_MODELS)]) -> ModelListBody:
    models: dict[str, dict[str, int]] = {}
    for namespace in core.list_namespaces():
        if not caller.may_use(namespace.name):
            continue
        for m in namespace.models:
            entry = models.setdefault(m.model_id, {"namespaces": 0, "complete": 0, "embeddings": 0})
            entry["namespaces"] += 1
            entry["complete"] += int(m.complete)
            entry["embeddings"] += m.embedded
    return ModelListBody(
        models=[
            ModelSummaryBody(
                model_id=model_id,
                served_here=model_id == core.model_id,
                namespaces=entry["namespaces"],
                complete_namespaces=entry["complete"],
                embeddings=entry["embeddings"],
            )
            for model_id, entry in sorted(models.items())
        ]
    )


@router.delete(
    "/{model_id:path}",
    response_model=DroppedModelBody,
    responses=error_responses(401, 403, 409, 422, 503),
    summary="Drop a model's embeddings in every namespace this API key may write to (not the "
    "model this server runs: 409); examples and stored images stay",
)
def drop_model(
    model_id: ModelId, core: Core, caller: Annotated[Principal, require(Action.DROP_MODEL)]
) -> DroppedModelBody:
    model_id = decode_path_param(model_id, "model id")
    holding = [
        n.name
        for n in core.list_namespaces()
        if caller.may_use(n.name) and any(m.model_id == model_id for m in n.models)
    ]
    dropped = core.drop_model(model_id, holding)
    return DroppedModelBody(model_id=model_id, dropped_embeddings=sum(dropped.values()), namespaces=holding)
