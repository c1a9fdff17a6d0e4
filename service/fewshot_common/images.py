"""Image bytes -> model input: decoding, request limits and preprocessing, in one place.

Embed, Classify and example uploads all go through :func:`load_batch`, so every transport refuses
the same inputs with the same messages. Nothing here depends on the model runtime.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError, InvalidInput, TooLarge
from .modelmeta import Preprocess

MiB = 1024 * 1024

# Transparent pixels are composited onto white: it is what image viewers show, and what a
# photographed object on a plain sheet looks like.
ALPHA_BACKGROUND = (255, 255, 255)

# JPEGs are decoded at reduced scale down to this many times the resize size, so the final
# antialiased resize still averages over several decoded pixels per output pixel.
DRAFT_FACTOR = 2

# Up to this aspect ratio the whole image is resized, then cropped (exactly torchvision's way).
_MAX_ASPECT_RESIZED = 16

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ImageLimits:
    """Per-request limits. A request over any of them is refused with :class:`errors.TooLarge`."""

    max_image_bytes: int = 20 * MiB
    max_pixels: int = 40_000_000
    max_images: int = 64

    def __post_init__(self) -> None:
        if min(self.max_image_bytes, self.max_pixels, self.max_images) <= 0:
            raise ValueError(f"image limits must be positive, got {self}")


def decode_image(
    data: bytes,
    index: int,
    limits: ImageLimits = ImageLimits(),
    *,
    min_short_side: int | None = None,
) -> Image.Image:
    """Decode one encoded image file into an RGB :class:`PIL.Image.Image`.

    The pixel count is checked from the header, *before* any pixel is decoded, so a
    decompression bomb costs nothing. Animated images give their first frame; EXIF rotation is
    applied; alpha is composited onto :data:`ALPHA_BACKGROUND`; 16-bit images are scaled to 8 bits.

    With ``min_short_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling) as long as its shorter side stays at least that long: a 12 MP photo then decodes
    about 5x faster, and the model, which sees a few dozen pixels, cannot tell.
    """
    if not data:
        raise ImageError(index, "empty image data")
    if len(data) > limits.max_image_bytes:
        raise TooLarge(
            f"image {index}: {len(data)} bytes exceeds the limit of {limits.max_image_bytes} bytes"
        )
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires first for images far beyond its default limit.
        raise TooLarge(f"image {index}: too many pixels ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(index, "not a decodable image (unknown or unsupported format)") from None
    except Exception as exc:  # any failure to parse untrusted bytes is the client's bad image
        raise ImageError(index, f"truncated or corrupt image data ({_reason(exc)})") from None

    width, height = img.size
    if width * height > limits.max_pixels:
        raise TooLarge(
            f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limits.max_pixels} pixels"
        )
    if width == 0 or height == 0:
        raise ImageError(index, f"image has no pixels ({width}x{height})")
    try:
        if min_short_side is not None and img.format == "JPEG":
            scale = min_short_side / min(width, height)
            if scale < 1:
                img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        img.load()  # first frame only for animations; raises on truncated data
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image {index}: too many pixels ({exc})") from None
    except Exception as exc:
        raise ImageError(index, f"truncated or corrupt image data ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see :func:`decode_image` for the policy)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # Pillow's own I -> L conversion clips at 255, which turns 16-bit photos white.
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        # Palette images may carry transparency in their palette; expand it to RGBA first.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """RGB image -> float32 ``[3, S, S]``: shorter side to ``resize_size``, centre crop, normalise.

    Sizes are rounded as torchvision's ``Resize(int)`` + ``CenterCrop`` do, so the server sees
    what the trainer's evaluation transform sees (bit for bit). For extreme aspect ratios only
    the cropped region is resampled (Pillow's ``box``; edge pixels may differ by a few levels),
    because the full resized image could be huge: 1 x 10,000,000 would become 36 x 360 M.
    """
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = pre.resize_size, int(pre.resize_size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    crop = pre.input_size
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    resample = _RESAMPLE[pre.interpolation]
    if new_long <= _MAX_ASPECT_RESIZED * new_short:
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), resample)
        img = img.crop((left, top, left + crop, top + crop))
    else:
        scale_x, scale_y = width / new_w, height / new_h
        box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
        img = img.resize((crop, crop), resample, box=box)

    pixels = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def load_batch(
    images: Sequence[bytes], pre: Preprocess, limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """Decode and preprocess a request's images into one ``[N, 3, S, S]`` float32 array.

    Fails on the first bad image, naming its 0-based index in the request.
    """
    if len(images) == 0:
        raise InvalidInput("the request has no images")
    if len(images) > limits.max_images:
        raise TooLarge(
            f"{len(images)} images in one request exceeds the limit of {limits.max_images}"
        )
    batch = np.empty((len(images), 3, pre.input_size, pre.input_size), dtype=np.float32)
    for index, data in enumerate(images):
        img = decode_image(data, index, limits, min_short_side=DRAFT_FACTOR * pre.resize_size)
        batch[index] = preprocess(img, pre)
    return batch
