"""The copy of an example's image kept beside its embedding, so a new model can embed it later.

Bounded so Redis memory stays predictable, and carrying no metadata (no EXIF with its GPS
position, XMP, comments or ICC profile): only pixels. A small JPEG (both sides within the bounds
below, at most :data:`KEEP_ORIGINAL_BYTES`, upright) is kept as uploaded minus every segment
decoding does not need, so its pixels are the very ones the model saw; any other small image is
stored as a PNG of its decoded pixels; anything larger, or any PNG over the byte bound, as a
baseline JPEG (quality :data:`JPEG_QUALITY`) of the decoded image scaled down to fit. Every model
preprocesses by resizing the *shorter* side to ``resize_size`` and cropping the centre (see
``modelmeta.Preprocess``); the largest the project serves is MSN's 256 (crop 224), so a shorter
side of :data:`MAX_SHORT_SIDE` leaves headroom above it for photos up to 8:3 (the longer side is
capped at :data:`MAX_LONG_SIDE`). The decode is the server's own (:func:`images.open_image`:
EXIF rotation applied, alpha on white, 16-bit scaled), so the copy decodes, under the same
limits, to what the model saw of the original, only smaller.

Untrusted bytes: called only inside a decode worker (decode_worker.py).
"""

from __future__ import annotations

import io

from PIL import Image

from fewshot_common.images import ImageLimits, OpenedImage, open_image
from fewshot_common.jpeg_scans import strip_jpeg_metadata

MAX_SHORT_SIDE = 384
MAX_LONG_SIDE = 1024
KEEP_ORIGINAL_BYTES = 256 * 1024
JPEG_QUALITY = 90
_EXIF_ORIENTATION = 0x0112


def fits(width: int, height: int) -> bool:
    return min(width, height) <= MAX_SHORT_SIDE and max(width, height) <= MAX_LONG_SIDE


def kept_as_uploaded(data: bytes, opened: OpenedImage) -> bytes | None:
    """The upload minus every segment decoding does not need, when it may be stored as it came
    (a small upright JPEG: the copy's pixels are the very ones the model saw); else None. Needs
    only the header ``opened`` already parsed, so the decode worker asks it of the image it
    opened for the model."""
    is_jpeg = opened.image.format in ("JPEG", "MPO")
    if not (is_jpeg and len(data) <= KEEP_ORIGINAL_BYTES and fits(*opened.source_size)):
        return None
    if opened.image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        return None
    return strip_jpeg_metadata(data)


def bounded_copy(data: bytes, limits: ImageLimits = ImageLimits(), index: int = 0) -> bytes:
    """The bytes to store for an uploaded image (already accepted by the embedder's checks)."""
    opened = open_image(data, index, limits, min_short_side=MAX_SHORT_SIDE)
    kept = kept_as_uploaded(data, opened)
    if kept is not None:
        return kept
    is_jpeg = opened.image.format in ("JPEG", "MPO")
    small = len(data) <= KEEP_ORIGINAL_BYTES and fits(*opened.source_size)
    image = opened.decode()  # RGB, upright
    # Pillow writes some of what it read back out (a JPEG's COM comment): keep only pixels.
    image.info.clear()
    if small and not is_jpeg:
        out = io.BytesIO()
        image.save(out, format="PNG")
        if out.tell() <= KEEP_ORIGINAL_BYTES:
            return out.getvalue()
    scale = min(1.0, MAX_SHORT_SIDE / min(image.size), MAX_LONG_SIDE / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
