"""Paged class listing: a stable order by label, an opaque cursor, an optional search.

The cursor names the last label of the page before (base64url of its UTF-8), so a page stays
right when classes are added or deleted between calls: nothing is skipped or repeated that
existed throughout. Clients must treat it as opaque; its form may change.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from fewshot_common.errors import InvalidInput

DEFAULT_PAGE_SIZE = 1000  # also the most a page holds: a request's work stays bounded
MAX_PAGE_SIZE = 1000
MAX_QUERY_CHARS = 128


def encode_cursor(label: str) -> str:
    return base64.urlsafe_b64encode(label.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The label a cursor names. A string this server did not hand out is not an error: it is
    a position of its own (the page starts after that text in label order), so any cursor a
    client sends gets a well-defined page (the API's schema accepts any string)."""
    try:
        padded = (cursor + "=" * (-len(cursor) % 4)).encode("ascii")
        label = base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        label = ""
    return label or cursor


def resolve_limit(limit: int | None) -> int:
    """0 (or unset) means :data:`DEFAULT_PAGE_SIZE`."""
    if not limit:
        return DEFAULT_PAGE_SIZE
    if limit < 0 or limit > MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be between 0 and {MAX_PAGE_SIZE}, got {limit}")
    return int(limit)


def label_matcher(query: str) -> Callable[[str], bool]:
    """The search of ``q``: labels containing ``query``, case-insensitive (a substring, which no
    index answers: the registry walks its label index from the cursor until the page is full)."""
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidInput(f"q must be at most {MAX_QUERY_CHARS} characters")
    needle = query.casefold()
    return lambda label: needle in label.casefold()
