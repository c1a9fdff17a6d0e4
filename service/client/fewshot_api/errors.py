"""The typed errors of the service, one hierarchy for the server and the client.

The core raises them; each transport maps them once to its own status codes (the table and
:func:`~fewshot_common.errors.lookup` are in :mod:`fewshot_common.errors`, which re-exports these
classes); the client raises the same classes for the server's answers, so one ``except NotFound``
works for the core, REST and gRPC alike. Plain Python: no dependency.
"""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "FailedPrecondition",
    "FewshotError",
    "ImageError",
    "InvalidInput",
    "ModelIncomplete",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedFormat",
]


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


class UnsupportedFormat(ImageError):
    """An image in a file format the server does not accept (told from its first bytes); the
    message names the accepted formats. HTTP 415; over gRPC INVALID_ARGUMENT like any bad image."""


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
