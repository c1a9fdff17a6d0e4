"""The client's exceptions: the server's own typed errors (:mod:`fewshot_api.errors`), so one
``except NotFound`` works for the core, REST and gRPC alike. Every exception the client raises for
a server answer is a :class:`FewshotError` with ``status`` (HTTP status or gRPC code name) and
``kind`` (the REST body's ``error``); over gRPC it is also a :class:`grpc.RpcError` with
``code()`` and ``details()``, so code written against the plain gRPC client keeps working.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import grpc

from fewshot_api.errors import (
    Cancelled,
    FailedPrecondition,
    FewshotError,
    ImageError,
    InvalidInput,
    NotFound,
    Overloaded,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnsupportedFormat,
)

__all__ = [
    "Cancelled",
    "FailedPrecondition",
    "FewshotError",
    "InvalidInput",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "from_grpc",
    "from_http",
]

# The REST body's "error" -> class; the server's table is rest/http_errors.HTTP_STATUS (a test
# keeps the two in step: this module must not import the server's FastAPI code).
REST_KINDS: dict[str, type[FewshotError]] = {
    "invalid_input": InvalidInput,
    "invalid_request": InvalidInput,  # a parameter FastAPI itself refused
    "bad_request": InvalidInput,
    "unsupported_format": UnsupportedFormat,  # a 415: the body's index says which image
    "too_large": TooLarge,
    "not_found": NotFound,
    "failed_precondition": FailedPrecondition,
    "unavailable": Unavailable,
    "overloaded": Overloaded,
    "cancelled": Cancelled,
    "unauthenticated": Unauthenticated,
    "permission_denied": PermissionDenied,
    "forbidden_origin": PermissionDenied,
}

# RESOURCE_EXHAUSTED stands for both TooLarge and Overloaded (a busy server); the message says
# which. TooLarge is the one a caller can fix.
GRPC_CODES: dict[grpc.StatusCode, type[FewshotError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLarge,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Cancelled,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_http(status: int, body: Any) -> FewshotError:
    """The exception for an HTTP error answer (``body``: its JSON, or None when it had none)."""
    body = body if isinstance(body, dict) else {}
    kind = str(body.get("error", ""))
    message = str(body.get("message", "")) or f"HTTP {status}"
    cls = REST_KINDS.get(kind) or (InvalidInput if 400 <= status < 500 else FewshotError)
    if issubclass(cls, ImageError):  # built from the server's whole message, as it is
        error = cls.__new__(cls)
        FewshotError.__init__(error, message)
        error.reason = message  # type: ignore[attr-defined]
    else:
        error = cls(message)
    error.status, error.kind = status, kind  # type: ignore[attr-defined]
    error.index = body.get("index")  # type: ignore[attr-defined]  # which image, if one was bad
    # A 409 during a model roll: how far this server's model is (model_id, embedded, total, ...).
    error.progress = body.get("progress")  # type: ignore[attr-defined]
    return error


class _GrpcStatus(grpc.RpcError):
    """The gRPC face of a client exception: ``code()`` and ``details()`` like grpc's own."""

    _code: grpc.StatusCode
    _details: str

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@cache
def _grpc_flavour(cls: type[FewshotError]) -> type[FewshotError]:
    # One subclass per typed error (NotFound and grpc.RpcError at once), made once.
    return type(cls.__name__, (cls, _GrpcStatus), {"__module__": __name__})


def from_grpc(error: grpc.RpcError) -> FewshotError:
    """The typed exception for a failed RPC."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or code.name  # type: ignore[attr-defined]
    typed = _grpc_flavour(GRPC_CODES.get(code, FewshotError))(details)
    typed._code, typed._details = code, details  # type: ignore[attr-defined]
    typed.status, typed.kind = code.name, code.name.lower()  # type: ignore[attr-defined]
    return typed
