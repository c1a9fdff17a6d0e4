"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...core.core import FewShotCore
from ..access import Action
from .schemas import HealthBody, ReadyBody, error_responses
from .security import require

router = APIRouter(tags=["health"])


def _core(request: Request) -> FewShotCore:
    # Not the Core dependency: a sync dependency runs on the thread pool, which a frozen Redis
    # may have filled with waiting requests.
    return request.app.state.core


# Both async: they answer on the event loop, never behind requests that hold the worker threads,
# and neither touches Redis (readiness reads the background probe's cached answer).
@router.get(
    "/healthz",
    response_model=HealthBody,
    responses={503: {"model": HealthBody, "description": "a part failed for good: restart the process"}},
    summary="Alive: the process answers and nothing in it failed for good (503: restart it)",
)
async def healthz(request: Request) -> JSONResponse:
    core = _core(request)
    alive = core.alive()
    body = HealthBody(status="ok" if alive else "failed")
    return JSONResponse(body.model_dump(), status_code=200 if alive else 503)


@router.get(
    "/readyz",
    response_model=ReadyBody,
    responses={503: {"model": ReadyBody, "description": "not ready: Redis unreachable"}},
    summary="Ready: model loaded and Redis reachable (503 when not)",
)
async def readyz(request: Request) -> JSONResponse:
    core = _core(request)
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
