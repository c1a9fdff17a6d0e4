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


def stray_byte_jpeg(repeats: int, size: tuple[int, int] = (256, 256)) -> bytes:
    """:func:`scan_repeating_jpeg` with a 0x00 after its APP0 segment: libjpeg skips the byte
    (with a warning) and decodes every scan; a marker walk that stops there counts none."""
    data = scan_repeating_jpeg(repeats, size)
    app0_end = 4 + ((data[4] << 8) | data[5])  # SOI, then APP0's marker and length
    return data[:app0_end] + b"\x00" + data[app0_end:]


def lossless_webp_bomb(size: tuple[int, int] = (6300, 6300)) -> bytes:
    """A flat lossless RGBA WebP: a few dozen bytes, ``4 * w * h`` bytes decoded (and more)."""
    return encode(Image.new("RGBA", size, (10, 20, 30, 128)), "WEBP", lossless=True)


def flat(fmt: str, size: tuple[int, int], mode: str = "RGB", **options) -> bytes:
    """A flat image in ``fmt``: PNG/GIF/TIFF deflate or LZW and BMP RLE make these tiny."""
    return encode(Image.new(mode, size, 7 if mode in ("L", "P") else (7, 8, 9)), fmt, **options)


def comment_flood_jpeg(megabytes: int) -> bytes:
    """A small JPEG with ``megabytes`` MB of COM segments before its frame."""
    data = encode(Image.new("RGB", (64, 64), (50, 60, 70)), "JPEG")
    comment = b"\xff\xfe\xff\xff" + b"x" * 0xFFFD
    return data[:2] + comment * (megabytes * (1 << 20) // len(comment)) + data[2:]


def empty_chunk_png(megabytes: int) -> bytes:
    """A small PNG with ``megabytes`` MB of empty ancillary chunks (12 bytes each) before IDAT."""
    import zlib

    data = encode(Image.new("RGB", (64, 64), (50, 60, 70)), "PNG")
    chunk = b"\x00\x00\x00\x00tEXt" + zlib.crc32(b"tEXt").to_bytes(4, "big")
    idat = data.index(b"IDAT") - 4
    return data[:idat] + chunk * (megabytes * (1 << 20) // len(chunk)) + data[idat:]


def rle_bmp_bomb(size: tuple[int, int] = (6000, 6000)) -> bytes:
    """An 8-bit RLE BMP of runs of 255 pixels: ~50 bytes a row, ``w*h`` decoded (and 4x in RGB)."""
    width, height = size
    row = b"\xff\x07" * (width // 255) + (bytes((width % 255, 7)) if width % 255 else b"")
    pixels = (row + b"\x00\x00") * height + b"\x00\x01"  # runs, end of line; end of bitmap
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    header_size, info = 14, 40
    offset = header_size + info + len(palette)
    import struct

    return (
        b"BM"
        + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
        + struct.pack("<IiiHHIIiiII", info, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
        + palette
        + pixels
    )


def ico_with_huge_png(size: int = 13000) -> bytes:
    """An ICO whose directory says 256 px while its embedded PNG is ``size`` px square."""
    import struct

    png = encode(Image.new("RGB", (size, size), (1, 2, 3)), "PNG")
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png
