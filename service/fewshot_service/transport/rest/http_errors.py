"""Every REST error is a JSON body ``{"error", "message"}``; the core's typed errors map to HTTP
statuses in one table, :data:`HTTP_STATUS` (the gRPC twin is ``grpc_server.GRPC_STATUS``)::

    {"error": "invalid_input", "message": "file 'b.png' (#1): not a decodable image (...)",
     "file": "b.png", "index": 1}
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from fewshot_common import errors

log = logging.getLogger(__name__)

# (status, error kind) per error class; errors.lookup() picks the nearest mapped class.
HTTP_STATUS: dict[type[errors.FewshotError], tuple[int, str]] = {
    errors.InvalidInput: (422, "invalid_input"),
    errors.UnsupportedFormat: (415, "unsupported_format"),
    errors.TooLarge: (413, "too_large"),
    errors.NotFound: (404, "not_found"),
    errors.FailedPrecondition: (409, "failed_precondition"),
    errors.Unavailable: (503, "unavailable"),
    errors.Overloaded: (429, "overloaded"),
    errors.Cancelled: (499, "cancelled"),  # the client has gone; nginx's code for it
    errors.Unauthenticated: (401, "unauthenticated"),
    errors.PermissionDenied: (403, "permission_denied"),
    errors.FewshotError: (500, "internal"),  # an error type nobody mapped: a bug, as over gRPC
}

# Errors Starlette raises itself (routing, body parsing).
_HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class NamedImageError(errors.InvalidInput):
    """An ImageError that knows the uploaded file's name, for the 422 body."""

    def __init__(self, error: errors.ImageError, filenames: list[str]) -> None:
        self.error = error  # its status is the wrapped error's (415 for an unsupported format)
        self.index = error.index
        self.filename = filenames[error.index] if error.index < len(filenames) else None
        name = f"file {self.filename!r} (#{self.index})" if self.filename else f"image {self.index}"
        super().__init__(f"{name}: {error.reason}")


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status, headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _documented_methods(request: Request) -> list[str] | None:
    """The methods the OpenAPI document lists for the most specific path template matching this
    (raw, percent-encoded) path, or None when no template matches it."""
    path = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0] or request.url.path
    best: tuple[int, list[str]] | None = None
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            literal = len(re.sub(r"\{[^}]+\}", "", template))
            methods = [m for m in _METHODS if m.lower() in operations]
            if best is None or literal > best[0]:
                best = (literal, methods)
    return best[1] if best else None


def _allowed_methods(request: Request) -> str:
    """``Allow`` of a 405: what the OpenAPI document says this path serves (Starlette's own
    header names only the first route whose path matched, and none at all for routes of an
    included router). Paths no template describes (an unencoded ``/`` in a label) fall back to
    asking every route about every method."""
    methods = _documented_methods(request)
    if methods is None:
        methods = [
            method
            for method in _METHODS
            if any(
                route.matches({**request.scope, "method": method})[0] == Match.FULL
                for route in request.app.router.routes
            )
        ]
    return ", ".join(methods)


def request_id_of(request: Request) -> str:
    """The id ``access_log.AccessLog`` gave this request (a fresh one without it)."""
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.FewshotError)
    async def fewshot_error(request: Request, exc: errors.FewshotError) -> JSONResponse:
        status, kind = errors.lookup(HTTP_STATUS, exc.error if isinstance(exc, NamedImageError) else exc)
        extra: dict[str, Any] = {}
        if isinstance(exc, NamedImageError):
            extra = {"file": exc.filename, "index": exc.index}
        elif isinstance(exc, errors.ImageError):
            extra = {"index": exc.index}
        elif isinstance(exc, errors.ModelIncomplete):
            extra = {"progress": exc.progress}
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status >= 500:
            # The detail (what Redis said, its address) stays in the log, under the request id.
            request_id = extra["request_id"] = request_id_of(request)
            detail = f" ({exc.detail})" if exc.detail else ""
            if isinstance(exc, errors.Unavailable):
                log.warning(
                    "request %s: %s %s: %s%s", request_id, request.method, request.url.path, exc, detail
                )
            else:
                log.error(
                    "request %s: unmapped %s in %s %s: %s%s",
                    request_id,
                    type(exc).__name__,
                    request.method,
                    request.url.path,
                    exc,
                    detail,
                )
        return error_response(status, kind, str(exc), headers=headers, **extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        kind = _HTTP_KINDS.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), headers=headers or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: logged with its traceback, answered in JSON all the same.
        request_id = request_id_of(request)
        log.exception("request %s: unexpected error in %s %s", request_id, request.method, request.url.path)
        return error_response(
            500, "internal", f"unexpected server error ({type(exc).__name__})", request_id=request_id
        )
