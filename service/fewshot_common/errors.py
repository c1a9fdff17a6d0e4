"""Typed errors of the service core. Each transport maps them once to its own status codes:

| error               | gRPC                | HTTP |
|---------------------|---------------------|------|
| InvalidInput        | INVALID_ARGUMENT    | 422  |
| UnsupportedFormat   | INVALID_ARGUMENT    | 415  |
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

from collections.abc import Mapping
from typing import TypeVar

# The classes live in fewshot_api (shipped with the client too), so the client raises the very
# classes the core does; this module adds the transports' lookup.
from fewshot_api.errors import (  # noqa: F401 (re-exported)
    Cancelled,
    FailedPrecondition,
    FewshotError,
    ImageError,
    InvalidInput,
    ModelIncomplete,
    NotFound,
    Overloaded,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnsupportedFormat,
)

T = TypeVar("T")


def lookup(table: Mapping[type[FewshotError], T], error: FewshotError) -> T:
    """``table``'s entry for the nearest class of ``error`` (its own first, then its bases).

    ``table`` must map :class:`FewshotError` itself, the fallback for unmapped error types.
    """
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]  # type: ignore[index]
    raise KeyError(f"{type(error).__name__} has no entry, and neither has FewshotError")
