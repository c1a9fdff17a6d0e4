"""The REST transport (FastAPI): classes and their examples, classify, health and metrics.

Handlers translate HTTP <-> :class:`FewShotCore` calls; errors map to statuses in one table
(:data:`_HTTP_STATUS`), and every error, even an unexpected one, has a JSON body::

    {"error": "invalid_input", "message": "file 'b.png' (#1): not a decodable image (...)",
     "file": "b.png", "index": 1}

Labels may contain ``/``. Routes are matched on the raw (still percent-encoded) path, so a client
that encodes ``/`` as ``%2F`` never collides with the ``/examples`` suffix; an unencoded ``/``
works too unless the label itself ends in ``/examples`` or ``/examples/<id>``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fewshot_common import errors

from . import __version__
from .core import FewShotCore, resolve_namespace

log = logging.getLogger(__name__)

CLASSES_PREFIX = "/v1/classes/"

_HTTP_STATUS: dict[type[errors.FewshotError], tuple[int, str]] = {
    errors.InvalidInput: (422, "invalid_input"),
    errors.TooLarge: (413, "too_large"),
    errors.NotFound: (404, "not_found"),
    errors.FailedPrecondition: (409, "failed_precondition"),
    errors.Unavailable: (503, "unavailable"),
    errors.Overloaded: (429, "overloaded"),
    errors.Cancelled: (499, "cancelled"),  # the client has gone; nginx's code for it
}

HTTP_RESPONSES = Counter(
    "fewshot_http_responses_total", "HTTP responses by method and status code.", ["method", "status"]
)

Namespace = Annotated[
    str | None, Query(description="Namespace of the classes (default: `default`)", max_length=128)
]
ImageFiles = Annotated[list[UploadFile], File(description="one or more image files")]


# -- response bodies (they also document the API at /docs) ----------------------------------------


class ErrorBody(BaseModel):
    error: str
    message: str


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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": name}
    for code, name in [(404, "unknown class or example"), (409, "failed precondition"),
                       (413, "a limit was exceeded"), (422, "bad input"), (503, "Redis unavailable")]
}  # fmt: skip


# -- the app ---------------------------------------------------------------------------------------


def create_app(core: FewShotCore, *, max_request_bytes: int = 64 * 1024 * 1024) -> FastAPI:
    app = FastAPI(
        title="fewshot",
        version=__version__,
        description="Few-shot image classification: define classes with a few examples each.",
    )
    _install_error_handlers(app)

    @app.post(
        "/v1/classes/{label:path}/examples",
        status_code=201,
        response_model=AddedBody,
        responses=ERROR_RESPONSES,
        summary="Add one or more example images to a class (created on first use)",
    )
    def add_examples(
        label: str,
        files: ImageFiles,
        namespace: Namespace = None,
    ) -> AddedBody:
        label = unquote(label)
        names = [f.filename or f"#{i}" for i, f in enumerate(files)]
        images = [f.file.read() for f in files]
        try:
            info = core.add_examples(namespace, label, images)
        except errors.ImageError as exc:
            raise _NamedImageError(exc, names) from None
        return AddedBody(
            namespace=_ns(namespace),
            label=info.label,
            count=info.count,
            example_ids=info.example_ids,
            added_example_ids=info.added_example_ids,
            model_id=core.model_id,
        )

    @app.get("/v1/classes", response_model=ClassListBody, responses=ERROR_RESPONSES)
    def list_classes(namespace: Namespace = None) -> ClassListBody:
        summaries = core.list_classes(namespace)
        return ClassListBody(
            namespace=_ns(namespace),
            classes=[ClassSummaryBody(label=s.label, count=s.count) for s in summaries],
        )

    @app.get("/v1/classes/{label:path}", response_model=ClassBody, responses=ERROR_RESPONSES)
    def get_class(label: str, namespace: Namespace = None) -> ClassBody:
        info = core.get_class(namespace, unquote(label))
        return ClassBody(
            namespace=_ns(namespace), label=info.label, count=info.count, example_ids=info.example_ids
        )

    # Declared before DELETE /v1/classes/{label}: a raw path ending in /examples/<id> is an example.
    @app.delete(
        "/v1/classes/{label:path}/examples/{example_id}",
        response_model=DeletedExampleBody,
        responses=ERROR_RESPONSES,
        summary="Remove one example; removing the last one removes the class",
    )
    def delete_example(
        label: str, example_id: str, namespace: Namespace = None
    ) -> DeletedExampleBody:
        label, example_id = unquote(label), unquote(example_id)
        info = core.delete_example(namespace, label, example_id)
        return DeletedExampleBody(
            namespace=_ns(namespace),
            label=label,
            example_id=example_id,
            count=info.count if info else 0,
            example_ids=info.example_ids if info else [],
            class_deleted=info is None,
        )

    @app.delete("/v1/classes/{label:path}", response_model=DeletedClassBody, responses=ERROR_RESPONSES)
    def delete_class(label: str, namespace: Namespace = None) -> DeletedClassBody:
        label = unquote(label)
        core.delete_class(namespace, label)
        return DeletedClassBody(namespace=_ns(namespace), label=label)

    @app.post(
        "/v1/classify",
        response_model=ClassifyBody,
        responses=ERROR_RESPONSES,
        summary="Classify images against a namespace's classes (score = cosine similarity)",
    )
    def classify(
        files: ImageFiles,
        namespace: Namespace = None,
        top_k: Annotated[int, Query(ge=1, le=1000, description="classes per image")] = 5,
    ) -> ClassifyBody:
        names = [f.filename or f"#{i}" for i, f in enumerate(files)]
        try:
            results = core.classify([f.file.read() for f in files], namespace, top_k)
        except errors.ImageError as exc:
            raise _NamedImageError(exc, names) from None
        return ClassifyBody(
            namespace=_ns(namespace),
            model_id=core.model_id,
            results=[[PredictionBody(label=p.label, score=p.score) for p in r] for r in results],
        )

    @app.get("/healthz", summary="Alive: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready: model loaded and Redis reachable (503 when not)")
    def readyz() -> JSONResponse:
        redis_ok = core.ready()
        body = {"ready": redis_ok, "model_loaded": True, "model_id": core.model_id, "redis": redis_ok}
        return JSONResponse(body, status_code=200 if redis_ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # The last added wraps the others: a request meets CountResponses, then BodyLimit, then
    # RawClassPath, so even a refused body is counted and routing sees the raw path.
    app.add_middleware(RawClassPath)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(CountResponses)
    return app


def _ns(namespace: str | None) -> str:
    return resolve_namespace(namespace)


class _NamedImageError(errors.InvalidInput):
    """An ImageError that knows the uploaded file's name, for the 422 body."""

    def __init__(self, error: errors.ImageError, filenames: list[str]) -> None:
        self.index = error.index
        self.filename = filenames[error.index] if error.index < len(filenames) else None
        name = f"file {self.filename!r} (#{self.index})" if self.filename else f"image {self.index}"
        super().__init__(f"{name}: {error.reason}")


# -- errors: a JSON body always --------------------------------------------------------------------


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.FewshotError)
    async def fewshot_error(request: Request, exc: errors.FewshotError) -> JSONResponse:
        for error_type, (status, kind) in _HTTP_STATUS.items():
            if isinstance(exc, error_type):
                extra: dict[str, Any] = {}
                if isinstance(exc, _NamedImageError):
                    extra = {"file": exc.filename, "index": exc.index}
                elif isinstance(exc, errors.ImageError):
                    extra = {"index": exc.index}
                return _error(status, kind, str(exc), **extra)
        return _error(503, "unavailable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
        ]
        return _error(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            {"error": kind, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: logged with its traceback, answered in JSON all the same.
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, "internal", f"unexpected server error ({type(exc).__name__})")


# -- ASGI middleware -------------------------------------------------------------------------------


class RawClassPath:
    """Route ``/v1/classes/...`` on the raw path, so ``%2F`` inside a label is not a separator.

    Handlers then percent-decode the label themselves (once).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(CLASSES_PREFIX):
            raw = scope.get("raw_path")
            if raw:
                scope = dict(scope, path=raw.decode("latin-1"))
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a request body over ``max_bytes``: by its Content-Length, or while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"request body of {int(declared)} bytes")
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a truncated body; ours follows
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await self._refuse(send, f"request body of more than {received} bytes")

    async def _refuse(self, send: Send, what: str) -> None:
        response = _error(413, "too_large", f"{what} exceeds the limit of {self.max_bytes} bytes")
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class CountResponses:
    """``fewshot_http_responses_total{method, status}`` for /metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                HTTP_RESPONSES.labels(scope["method"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

