"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..access import Action
from .dependencies import Core
from .schemas import HealthBody, ReadyBody, error_responses
from .security import require

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthBody, summary="Alive: the process answers")
def healthz() -> HealthBody:
    return HealthBody(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyBody,
    responses={503: {"model": ReadyBody, "description": "not ready: Redis unreachable"}},
    summary="Ready: model loaded and Redis reachable (503 when not)",
)
def readyz(core: Core) -> JSONResponse:
    redis_ok = core.ready()
    body = ReadyBody(ready=redis_ok, model_loaded=True, model_id=core.model_id, redis=redis_ok)
    return JSONResponse(body.model_dump(), status_code=200 if redis_ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (with --api-keys: any valid key)",
    response_class=Response,
    dependencies=[require(Action.METRICS)],
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        **error_responses(401),
    },
)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
