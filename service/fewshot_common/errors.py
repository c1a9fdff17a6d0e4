"""Typed errors of the service core. Each transport maps them once to its own status codes:

| error               | gRPC                | HTTP |
|---------------------|---------------------|------|
| InvalidInput        | INVALID_ARGUMENT    | 422  |
| TooLarge            | RESOURCE_EXHAUSTED  | 413  |
| NotFound            | NOT_FOUND           | 404  |
| FailedPrecondition  | FAILED_PRECONDITION | 409  |
| Unavailable         | UNAVAILABLE         | 503  |
| Overloaded          | RESOURCE_EXHAUSTED  | 429  |
| Cancelled           | CANCELLED           | 499  |
| Unauthenticated     | UNAUTHENTICATED     | 401  |
| PermissionDenied    | PERMISSION_DENIED   | 403  |
| any other           | INTERNAL            | 500  |

Each table is keyed by these classes; :func:`lookup` picks the entry of an error's nearest mapped
class, so a subclass (``ImageError``) inherits its parent's status and an error type nobody mapped
falls back to ``FewshotError``'s entry -- the same answer class on every transport.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


class FewshotError(Exception):
    """Base class: ``str(err)`` is a message fit to show the client; ``detail`` (optional) is for
    the server log only (e.g. what Redis answered), never sent to a client."""

    def __init__(self, message: str = "", *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class InvalidInput(FewshotError):
    """The request is malformed: undecodable image, bad label, bad parameter."""


class ImageError(InvalidInput):
    """One image of a request could not be used; ``index`` says which (0-based, request order)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index
        self.reason = reason


class TooLarge(FewshotError):
    """A configured limit was exceeded: bytes, pixels or images per request."""


class NotFound(FewshotError):
    """Unknown class or example."""


class FailedPrecondition(FewshotError):
    """The system is not in a state to answer: no classes yet, or a model mismatch."""


class ModelIncomplete(FailedPrecondition):
    """A namespace's examples are not all embedded with the model this server runs yet (a model
    roll-out backfills them from stored images). ``progress`` says how far: ``model_id``,
    ``embedded``, ``total``, ``without_image`` (examples that can only be re-uploaded) and
    ``backfilling``; REST puts it in the 409 body, gRPC in the message."""

    def __init__(self, message: str, progress: dict[str, object]) -> None:
        super().__init__(message)
        self.progress = progress


class Unavailable(FewshotError):
    """A dependency (Redis) cannot be reached; retrying later may succeed."""


class Overloaded(FewshotError):
    """The server is busy (its decode queue is full): the same request may succeed later."""


class Cancelled(FewshotError):
    """The caller went away or its deadline passed, so the work for it was stopped."""


class Unauthenticated(FewshotError):
    """No API key, or one the server does not know (the message never repeats the key)."""


class PermissionDenied(FewshotError):
    """A known API key asked for something outside its role or namespaces."""


def lookup(table: "Mapping[type[FewshotError], T]", error: FewshotError) -> T:
    """``table``'s entry for the nearest class of ``error`` (its own first, then its bases).

    ``table`` must map :class:`FewshotError` itself, the fallback for unmapped error types.
    """
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]  # type: ignore[index]
    raise KeyError(f"{type(error).__name__} has no entry, and neither has FewshotError")
