"""Hostile but small image files, made in memory: each is cheap to send and was costly to decode."""

from __future__ import annotations

import numpy as np
from PIL import Image

from image_samples import encode


def progressive_jpeg(size: tuple[int, int] = (256, 256), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", progressive=True, quality=80)


def scan_repeating_jpeg(repeats: int, size: tuple[int, int] = (256, 256)) -> bytes:
    """A flat progressive JPEG whose last scan (SOS header + data) is repeated ``repeats`` times.

    Still a valid file of the same dimensions, and small (a flat image's scans are a few dozen
    bytes); libjpeg decodes every repeated scan over the whole image, so decode time grows with
    ``repeats`` while the pixel count stays put.
    """
    data = encode(Image.new("RGB", size, (120, 130, 140)), "JPEG", progressive=True)
    last_scan = data.rindex(b"\xff\xda")
    eoi = data.rindex(b"\xff\xd9")
    return data[:last_scan] + data[last_scan:eoi] * (1 + repeats) + data[eoi:]


def wide_tiff(mode: str, size: tuple[int, int]) -> bytes:
    """A flat ``mode`` ("I" 32-bit int, "F" float, "I;16") TIFF, deflated to a few hundred KB."""
    value = 1000.0 if mode == "F" else 40000
    return encode(Image.new(mode, size, value), "TIFF", compression="tiff_adobe_deflate")


def sixteen_bit_png(size: tuple[int, int], value: int = 128 * 257) -> bytes:
    """A flat 16-bit grey PNG: tiny on the wire, ``2 * w * h`` bytes decoded."""
    return encode(Image.new("I;16", size, value), "PNG")
