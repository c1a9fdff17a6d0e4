"""What the REST handlers depend on: the one core, and the uploaded images of a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Iterator

from fastapi import Depends, File, Query, Request, UploadFile

from fewshot_common import errors

from ..core import MAX_NAME_CHARS, MAX_TOP_K, FewShotCore
from .http_errors import NamedImageError


def get_core(request: Request) -> FewShotCore:
    return request.app.state.core


Core = Annotated[FewShotCore, Depends(get_core)]

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
    files: Annotated[list[UploadFile], File(
        description="one or more image files (JPEG, PNG, WebP, ...)",
        min_length=1,
        # An empty file is never an image: say so in the schema, as the core refuses it.
        json_schema_extra={"items": {"type": "string", "format": "binary", "minLength": 1}},
    )],  # fmt: skip
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
