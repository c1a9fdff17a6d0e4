"""The copy of an example's image kept beside its embedding, so a new model can embed it later.

Bounded so Redis memory stays predictable: the uploaded file itself when it is already small
(both sides within the bounds below and at most :data:`KEEP_ORIGINAL_BYTES`), else a baseline
JPEG (quality :data:`JPEG_QUALITY`) of the decoded image scaled down to fit. Every model
preprocesses by resizing the *shorter* side to ``resize_size`` and cropping the centre (see
``modelmeta.Preprocess``); the largest the project serves is MSN's 256 (crop 224), so a shorter
side of :data:`MAX_SHORT_SIDE` leaves headroom above it for photos up to 8:3 (the longer side is
capped at :data:`MAX_LONG_SIDE`). The decode is the server's own (:func:`images.open_image`:
EXIF rotation applied, alpha on white, 16-bit scaled), so the copy decodes, under the same
limits, to what the model saw of the original, only smaller.
"""

from __future__ import annotations

import io

from PIL import Image

from fewshot_common.images import ImageLimits, open_image

MAX_SHORT_SIDE = 384
MAX_LONG_SIDE = 1024
KEEP_ORIGINAL_BYTES = 256 * 1024
JPEG_QUALITY = 90
# Formats kept as uploaded when small: the ones every Pillow build decodes.
_KEPT_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})


def fits(width: int, height: int) -> bool:
    return min(width, height) <= MAX_SHORT_SIDE and max(width, height) <= MAX_LONG_SIDE


def bounded_copy(data: bytes, limits: ImageLimits = ImageLimits()) -> bytes:
    """The bytes to store for an uploaded image (already accepted by the embedder's checks)."""
    opened = open_image(data, 0, limits, min_short_side=MAX_SHORT_SIDE)
    original = opened.image
    width, height = Image.open(io.BytesIO(data)).size if original.format == "JPEG" else original.size
    if len(data) <= KEEP_ORIGINAL_BYTES and original.format in _KEPT_FORMATS and fits(width, height):
        return data
    image = opened.decode()  # RGB, upright
    scale = min(1.0, MAX_SHORT_SIDE / min(image.size), MAX_LONG_SIDE / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
