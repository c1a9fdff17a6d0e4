"""/v1/embed: the embedding of each uploaded image (the REST twin of gRPC ``Embed``)."""

from __future__ import annotations

from fastapi import APIRouter

from ..access import Action
from .dependencies import IMAGE_UPLOAD_OPENAPI, Core, Images, RequestCancellation, StrictQuery
from .schemas import EmbedBody, error_responses
from .security import require

router = APIRouter(tags=["classify"], dependencies=[StrictQuery])


@router.post(
    "/v1/embed",
    response_model=EmbedBody,
    responses=error_responses(400, 401, 413, 422, 503),
    openapi_extra=IMAGE_UPLOAD_OPENAPI,
    dependencies=[require(Action.EMBED)],  # any valid key
    summary="Embed images: one L2-normalised vector per image (what classes are built from)",
)
def embed(images: Images, core: Core, cancellation: RequestCancellation) -> EmbedBody:
    vectors = core.embed(images.contents, cancellation=cancellation)
    return EmbedBody(model_id=core.model_id, dim=int(vectors.shape[1]), embeddings=vectors.tolist())
