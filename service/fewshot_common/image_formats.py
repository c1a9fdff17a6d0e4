"""Which file formats the server decodes, told from an image's first bytes before any decoder runs.

Pillow registers some 40 decoders (JPEG 2000, FITS, SPIDER, QOI, ICNS...), each a parser of
untrusted bytes that nobody here needs; an allowlist keeps all but a few out of reach. The magic
numbers are checked here, and ``Image.open(..., formats=...)`` is given the same list as a second
wall (a file that sniffs as PNG yet only another plugin accepts is still refused).
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import UnsupportedFormat

# Pillow's format name -> the magic numbers that start such a file (checked with startswith).
MAGIC: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "WEBP": (),  # RIFF....WEBP: see sniff_format
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),  # classic and BigTIFF
}
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def sniff_format(data: bytes) -> str | None:
    """The format (a key of :data:`MAGIC`) whose magic number ``data`` starts with, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for name, magics in MAGIC.items():
        if data.startswith(magics):
            return name
    return None


def normalise_formats(names: Iterable[str]) -> tuple[str, ...]:
    """Upper-cased, de-duplicated, each one known (ValueError names the known ones)."""
    aliases = {"JPG": "JPEG", "TIF": "TIFF"}
    result: list[str] = []
    for raw in names:
        name = aliases.get(raw.strip().upper(), raw.strip().upper())
        if name not in MAGIC:
            raise ValueError(f"unknown image format {raw!r}: choose from {', '.join(MAGIC)}")
        if name not in result:
            result.append(name)
    if not result:
        raise ValueError("at least one image format must be accepted")
    return tuple(result)


def check_format(data: bytes, index: int, allowed: tuple[str, ...]) -> str:
    """``data``'s format if it is one of ``allowed``, else :class:`UnsupportedFormat`."""
    name = sniff_format(data)
    if name is None or name not in allowed:
        what = (
            f"{name} images are not accepted"
            if name
            else ("not a decodable image (unknown or unsupported format)")
        )
        raise UnsupportedFormat(index, f"{what}: send one of {', '.join(allowed)}")
    return name
