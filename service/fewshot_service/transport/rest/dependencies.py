"""What the REST handlers depend on: the one core, and the uploaded images of a request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import unquote, unquote_to_bytes

from fastapi import Depends, File, Query, Request, UploadFile

from fewshot_common import errors
from fewshot_common.cancellation import Cancellation

from ...core.core import FewShotCore
from ...names import MAX_NAME_CHARS, MAX_TOP_K
from .http_errors import NamedImageError


def get_core(request: Request) -> FewShotCore:
    return request.app.state.core


Core = Annotated[FewShotCore, Depends(get_core)]


def _not_utf8(what: str, exc: UnicodeDecodeError) -> errors.InvalidInput:
    return errors.InvalidInput(
        f"{what} is not valid UTF-8 once percent-decoded ({exc.reason} at byte {exc.start})"
    )


def decode_path_param(value: str, what: str) -> str:
    """Percent-decode a raw path parameter (label, example id) strictly: bytes that are not
    UTF-8 are refused, not turned into U+FFFD (``bad%FF`` and ``bad%FE`` must not be one class)."""
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError as exc:
        raise _not_utf8(what, exc) from None


def strict_query_string(request: Request) -> None:
    """Refuse a query string whose parameters are not UTF-8 once percent-decoded.

    Starlette decodes query parameters with replacement characters, so ``namespace=bad%FF``
    would silently become ``bad\ufffd``; this re-reads the raw bytes strictly first.
    """
    for pair in request.scope.get("query_string", b"").split(b"&"):
        name, _, value = pair.partition(b"=")
        shown = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", errors="replace")
        for part in (name, value):
            try:
                unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(f"query parameter {shown!r}", exc) from None


StrictQuery = Depends(strict_query_string)

# How often a request whose work runs in the thread pool checks that its client is still there.
DISCONNECT_POLL_S = 0.1


async def cancel_on_disconnect(request: Request) -> AsyncIterator[Cancellation]:
    """A handle that is cancelled when the client disconnects while its (sync) handler runs in
    the thread pool, so the core stops decoding or queueing for nobody. The body has been read
    by the time dependencies run, so the next ASGI message can only be ``http.disconnect``."""
    cancellation = Cancellation()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        cancellation.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield cancellation
    finally:
        watcher.cancel()


RequestCancellation = Annotated[Cancellation, Depends(cancel_on_disconnect)]

# The core checks these values (the same way for gRPC); the schema only describes its rules.
Namespace = Annotated[
    str | None,
    Query(
        description="Namespace of the classes (empty or absent: `default`)",
        json_schema_extra={"maxLength": MAX_NAME_CHARS},
    ),
]
TopK = Annotated[
    int,
    Query(
        description="classes per image (0: the default, 5)",
        json_schema_extra={"minimum": 0, "maximum": MAX_TOP_K},
    ),
]

UnknownRate = Annotated[
    float,
    Query(
        description="share of images of registered classes to flag unknown (0: the server default)",
        json_schema_extra={"minimum": 0, "exclusiveMaximum": 1},
    ),
]


@dataclass(frozen=True)
class Uploads:
    names: list[str]  # the client's file names, or ``#<index>``
    contents: list[bytes]


def read_uploads(
    files: Annotated[
        list[UploadFile],
        File(
            description="one or more image files (JPEG, PNG, WebP, ...)",
            min_length=1,
            # An empty file is never an image: say so in the schema, as the core refuses it.
            json_schema_extra={"items": {"type": "string", "format": "binary", "minLength": 1}},
        ),
    ],
) -> Iterator[Uploads]:
    """The request's files; an image the core refuses is reported by its file name (the one
    place that does so for every route that takes uploads)."""
    uploads = Uploads(
        names=[f.filename or f"#{i}" for i, f in enumerate(files)],
        contents=[f.file.read() for f in files],
    )
    try:
        yield uploads
    except errors.ImageError as exc:
        raise NamedImageError(exc, uploads.names) from None


Images = Annotated[Uploads, Depends(read_uploads)]

# For the routes that take Images: the multipart part `files` holds images (any format Pillow
# decodes), so a client generating requests from the schema sends images, not arbitrary files.
IMAGE_UPLOAD_OPENAPI = {
    "requestBody": {"content": {"multipart/form-data": {"encoding": {"files": {"contentType": "image/*"}}}}}
}
