"""Count the scans (SOS segments) of a JPEG by walking its markers, without decoding it.

A progressive JPEG is decoded scan by scan, and every scan revisits the whole image, so the scan
count bounds the CPU time of a decode that the pixel count does not: a 249 KB file repeating
its last scan a few thousand times took 57 s to decode. Walking the markers costs one pass over
the bytes in C: entropy-coded data is skipped by one regular-expression search for the next 0xFF
that starts a real marker (0xFF00 is a stuffed byte, 0xFFD0-0xFFD7 are restart markers, 0xFFFF a
fill byte before a marker).
"""

from __future__ import annotations

import re

_SOS, _EOI = 0xDA, 0xD9
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xDA)}
# An 0xFF followed by a byte that ends entropy-coded data. One search in C: stepping from one 0xFF
# to the next in Python (one every ~256 bytes) cost a sixth of a large photo's decode
# (docs/benchmarks/code-notes.md).
_MARKER_AFTER_ENTROPY_CODED = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
# libjpeg's next_marker: skip any bytes up to an 0xFF, any fill 0xFFs, and 0xFF00 pairs.
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xff]")


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """Scans in ``data`` (a JPEG), counting up to ``stop_after + 1`` at most.

    Between segments, bytes that start no marker are skipped as libjpeg's ``next_marker`` skips
    them (it warns and decodes on): a stray 0x00 after APP0 once ended this walk at 0 scans while
    libjpeg went on to decode thousands. Malformed structure otherwise ends the walk early with
    the scans seen so far; the decoder reports the corruption itself.
    """
    scans, pos, end = 0, 2, len(data)  # past SOI
    while pos < end:
        found = _NEXT_MARKER.search(data, pos)
        if found is None:
            return scans
        marker, pos = data[found.end() - 1], found.end()
        if marker == _EOI:
            return scans
        if marker in _STANDALONE:
            continue
        if pos + 2 > end:
            return scans
        length = (data[pos] << 8) | data[pos + 1]
        pos += length
        if marker != _SOS:
            continue
        scans += 1
        if stop_after is not None and scans > stop_after:
            return scans
        pos = _skip_entropy_coded(data, pos)
    return scans


def _skip_entropy_coded(data: bytes, pos: int) -> int:
    """Position of the first marker after the entropy-coded data starting at ``pos``."""
    found = _MARKER_AFTER_ENTROPY_CODED.search(data, pos)
    return len(data) if found is None else found.start()


# Segments a stored JPEG keeps: what decoding needs (frame, tables, scans, restart interval),
# JFIF's APP0 and Adobe's APP14 (it says how the colours are coded). Every other APPn (EXIF,
# XMP, ICC, maker notes), COM, and bytes that start no marker are metadata or junk.
_KEPT = {
    0xC0,
    0xC1,
    0xC2,
    0xC3,
    0xC5,
    0xC6,
    0xC7,
    0xC9,
    0xCA,
    0xCB,
    0xCD,
    0xCE,
    0xCF,
    0xC4,
    0xCC,
    0xDB,
    0xDD,
    0xDE,
    0xDF,
    _SOS,
}


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """``data`` with only the segments decoding needs (see :data:`_KEPT`), the entropy-coded
    data copied as is (no re-encoding), nothing after EOI; None if the structure is not walkable."""
    out, pos, end = [b"\xff\xd8"], 2, len(data)
    while pos < end:
        found = _NEXT_MARKER.search(data, pos)
        if found is None:
            return None
        marker, pos = data[found.end() - 1], found.end()
        if marker == _EOI:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if marker in _STANDALONE:
            out.append(bytes((0xFF, marker)))
            continue
        if pos + 2 > end:
            return None
        segment_end = pos + ((data[pos] << 8) | data[pos + 1])
        if segment_end > end:
            return None
        body = data[pos + 2 : segment_end]
        keep = (
            marker in _KEPT
            or (marker == 0xE0 and body.startswith(b"JFIF\0"))
            or (marker == 0xEE and body.startswith(b"Adobe"))
        )
        if keep:
            out.append(bytes((0xFF, marker)) + data[pos:segment_end])
        pos = segment_end
        if marker == _SOS:
            pos = _skip_entropy_coded(data, pos)
            out.append(data[segment_end:pos])
    return None
