"""Count the scans (SOS segments) of a JPEG by walking its markers, without decoding it.

A progressive JPEG is decoded scan by scan, and every scan revisits the whole image, so the scan
count bounds the CPU time of a decode that the pixel count does not: a 249 KB file repeating
its last scan a few thousand times took 57 s to decode. Walking the markers costs one pass over
the bytes in C (``bytes.find``); entropy-coded data is skipped by looking for the next 0xFF that
starts a real marker (0xFF00 is a stuffed byte, 0xFFD0-0xFFD7 are restart markers).
"""

from __future__ import annotations

_SOS, _EOI = 0xDA, 0xD9
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xDA)}


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """Scans in ``data`` (a JPEG), counting up to ``stop_after + 1`` at most.

    Malformed structure ends the walk early with the scans seen so far; the decoder reports
    the corruption itself.
    """
    scans, pos, end = 0, 2, len(data)  # past SOI
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return scans
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _EOI:
            return scans
        if marker in _STANDALONE:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        pos += 2 + length
        if marker != _SOS:
            continue
        scans += 1
        if stop_after is not None and scans > stop_after:
            return scans
        pos = _skip_entropy_coded(data, pos)
    return scans


def _skip_entropy_coded(data: bytes, pos: int) -> int:
    """Position of the first marker after the entropy-coded data starting at ``pos``."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1 if following == 0xFF else 2
            continue
        return pos
