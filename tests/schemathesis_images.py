"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_images``) for tests/test_openapi.py.

The API takes images where its schema says ``format: binary``; JSON Schema cannot say "a
decodable image", so schema-valid uploads are drawn from real image files (PNG, JPEG, GIF, WebP,
of the kinds ``image_samples`` makes) instead of arbitrary bytes, PDFs or ZIPs.
"""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st
from PIL import Image

import image_samples

IMAGES = [
    image_samples.solid_png((230, 20, 20)),
    image_samples.solid_png((20, 200, 40), size=(7, 3)),
    *(image_samples.encode(Image.new("RGB", (9, 12), (20, 30, 220)), fmt) for fmt in ("JPEG", "GIF", "WEBP")),
]

schemathesis.openapi.format("binary", st.sampled_from(IMAGES))
