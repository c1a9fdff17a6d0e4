"""Encoded test images in every awkward mode a client may send, made with Pillow in memory."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def solid_png(rgb: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(Image.new("RGB", size, rgb), "PNG")


def noise_png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def grey_png() -> bytes:
    return encode(Image.new("L", (40, 40), 100), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")  # red in CMYK


def sixteen_bit_png(value: int = 32896) -> bytes:
    """A 16-bit grey PNG; 32896 = 128 * 257 is mid-grey."""
    return encode(Image.fromarray(np.full((40, 40), value, dtype=np.uint16)), "PNG")


def palette_png() -> bytes:
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)  # index 1 is (0, 128, 0)
    return encode(img, "PNG")


def transparent_png() -> bytes:
    """Fully transparent black: composited onto white it must come out white."""
    return encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG")


def transparent_palette_gif() -> bytes:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(img, "GIF", transparency=0)


def animated_gif() -> bytes:
    """Two frames, red then blue: the first frame must win."""
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def grey_alpha_png() -> bytes:
    return encode(Image.new("LA", (40, 40), (30, 128)), "PNG")


def awkward_images() -> dict[str, bytes]:
    """Every mode issue 3 calls valid, plus the other common formats."""
    rgb = Image.new("RGB", (40, 30), (10, 200, 30))
    return {
        "grey": grey_png(),
        "cmyk": cmyk_jpeg(),
        "16-bit": sixteen_bit_png(),
        "palette": palette_png(),
        "alpha": transparent_png(),
        "grey+alpha": grey_alpha_png(),
        "palette+transparency": transparent_palette_gif(),
        "animated": animated_gif(),
        "webp": encode(rgb, "WEBP"),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF"),
        "jpeg": encode(rgb, "JPEG"),
    }


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG claiming ``width`` x ``height`` whose image data holds one row at most.

    Decoding it would fail as truncated; only a check made from the header can call it too large.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
