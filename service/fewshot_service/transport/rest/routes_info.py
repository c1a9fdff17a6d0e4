"""/v1/info: what this server runs -- its version, the model, its preprocessing and licence."""

from __future__ import annotations

from dataclasses import asdict
from functools import cache

from fastapi import APIRouter

from fewshot_common import __version__
from fewshot_common.embedder import Embedder
from fewshot_common.model_license import model_license

from .dependencies import Core
from .schemas import InfoBody, PreprocessBody

router = APIRouter(tags=["health"])


@cache
def _info(embedder: Embedder) -> InfoBody:
    # Fixed for the life of the process: read the licence file once, not per request.
    meta = embedder.meta
    return InfoBody(
        version=__version__,
        model_id=meta.model_id,
        arch=meta.arch,
        embedding_dim=meta.embedding_dim,
        precision=meta.precision,
        engine=embedder.engine,
        preprocess=PreprocessBody(**asdict(meta.preprocess)),
        license=model_license(embedder.path, meta),
    )


@router.get(
    "/v1/info",
    response_model=InfoBody,
    summary="Server version, model, preprocessing and the model's licence",
)
def info(core: Core) -> InfoBody:
    return _info(core.embedder)
