"""Serving an example's stored image back (GET /v1/classes/{label}/examples/{id}/image).

What is served is the copy :mod:`stored_images` kept: already bounded and free of metadata, so
without ``size`` the stored bytes go out as they are. With ``size``, a thumbnail whose longer side
is at most ``size`` is made from them (never enlarged: a copy already that small is served as
stored), in the stored format. The stored bytes were written by this server's own
:func:`stored_images.bounded_copy` (or restored from an export by an operator), so they are
decoded here, in the request thread, rather than in a decode worker; still only as JPEG or PNG
and under :data:`THUMBNAIL_LIMITS`, so a copy that is not what the server writes costs no more
than one it wrote. Thumbnails are kept in a small LRU keyed by the stored bytes' digest, so a
gallery scrolled twice resizes each image once.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from fewshot_common.errors import FailedPrecondition, FewshotError, InvalidInput
from fewshot_common.image_formats import sniff_format
from fewshot_common.images import ImageLimits, open_image

from .stored_images import MAX_LONG_SIDE, MAX_SHORT_SIDE

MIN_THUMBNAIL = 16
MAX_THUMBNAIL = 512
THUMBNAIL_JPEG_QUALITY = 85
# Four times what bounded_copy writes, for copies restored from older exports.
THUMBNAIL_LIMITS = ImageLimits(
    max_image_bytes=4 * 1024 * 1024,
    max_pixels=4 * MAX_SHORT_SIDE * MAX_LONG_SIDE,
    max_images=1,
    max_decoded_bytes=64 * 1024 * 1024,
    formats=("JPEG", "PNG"),
)
CACHE_BYTES = 16 * 1024 * 1024

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
# A stored copy in no format above (only possible from a hand-made export): served as bytes.
UNKNOWN_MEDIA_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    digest: str  # of the stored bytes: the same bytes, the same digest, whatever the namespace

    @classmethod
    def of(cls, data: bytes) -> StoredImage:
        media_type = MEDIA_TYPES.get(sniff_format(data) or "", UNKNOWN_MEDIA_TYPE)
        return cls(data, media_type, hashlib.sha256(data).hexdigest()[:32])

    def etag(self, size: int | None) -> str:
        """A strong ETag: the stored bytes' digest and the size asked for."""
        return f'"{self.digest}-{size if size is not None else "stored"}"'


def check_size(size: int | None) -> int | None:
    if size is None:
        return None
    if not MIN_THUMBNAIL <= size <= MAX_THUMBNAIL:
        raise InvalidInput(f"size must be between {MIN_THUMBNAIL} and {MAX_THUMBNAIL} pixels, got {size}")
    return size


class Thumbnails:
    """Thumbnails of stored images, with an LRU of at most ``cache_bytes`` of them."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def of(self, image: StoredImage, size: int | None) -> bytes:
        """``image`` with its longer side at most ``size`` (None: as stored)."""
        if size is None or image.media_type not in ("image/jpeg", "image/png"):
            return image.data
        key = (image.digest, size)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        made = _thumbnail(image.data, size)
        with self._lock:
            if key not in self._cache and len(made) <= self.cache_bytes:
                self._cache[key] = made
                self._held += len(made)
                while self._held > self.cache_bytes:
                    _, dropped = self._cache.popitem(last=False)
                    self._held -= len(dropped)
        return made


def _thumbnail(data: bytes, size: int) -> bytes:
    try:
        opened = open_image(data, 0, THUMBNAIL_LIMITS)
        if max(opened.image.size) <= size:
            return data  # never enlarged
        file_format = opened.image.format
        # A JPEG is decoded at 1/2..1/8 scale when that still leaves `size` pixels (DCT scaling).
        opened.image.draft("RGB", (size, size))
        image = opened.decode()
    except FewshotError:
        raise FailedPrecondition(
            "the stored image of this example cannot be made into a thumbnail; ask without size"
        ) from None
    image.info.clear()  # only pixels go out, whatever the stored copy carried
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if file_format == "PNG":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return out.getvalue()
