#!/usr/bin/env python3
"""Five shots, then classify: the whole REST flow against a running `fewshot serve`.

Needs nothing but Python 3 and the server (no package of this project, no Pillow): the images are
generated here as PNGs (red discs vs. blue stripes), or pass your own folders, one per class.

    python examples/quickstart.py                          # http://localhost:8000, generated images
    python examples/quickstart.py --url http://host:8000 --class cat=photos/cat --class dog=photos/dog \\
        --query photos/unknown.jpg
    FEWSHOT_API_KEY=...  python examples/quickstart.py     # sent as Authorization: Bearer
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path

SHOTS = 5
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


# --- generated images: a minimal PNG writer (stdlib zlib) -------------------------------------


def png(width: int, height: int, pixel) -> bytes:
    """An RGB PNG whose pixel (x, y) is ``pixel(x, y) -> (r, g, b)``."""
    rows = b"".join(b"\x00" + bytes(c for x in range(width) for c in pixel(x, y)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def red_discs(seed: int) -> bytes:
    centres = [((17 + seed * 13 + i * 29) % 70 + 13, (15 + seed * 7 + i * 31) % 70 + 13) for i in range(3)]
    inside = lambda x, y: any((x - cx) ** 2 + (y - cy) ** 2 < 169 for cx, cy in centres)  # noqa: E731
    return png(96, 96, lambda x, y: (220, 20, 30) if inside(x, y) else (250, 240 - seed * 8, 230))


def blue_stripes(seed: int) -> bytes:
    return png(96, 96, lambda x, y: (20, 40, 200 + seed * 5) if (x + seed) % 12 < 6 else (230, 235, 250))


def grey_noise(seed: int) -> bytes:
    return png(96, 96, lambda x, y: ((x * 7 + y * 13 + seed) % 50 + 100,) * 3)


# --- a tiny REST client --------------------------------------------------------------------------


class Api:
    def __init__(self, url: str, api_key: str | None, namespace: str) -> None:
        self.url, self.api_key, self.namespace = url.rstrip("/"), api_key, namespace

    def call(self, method: str, path: str, files: list[tuple[str, bytes]] | None = None, **params) -> dict:
        query = urllib.parse.urlencode({"namespace": self.namespace, **params})
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = None
        if files is not None:
            boundary = uuid.uuid4().hex
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
            body = (
                b"".join(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode()
                    + data
                    + b"\r\n"
                    for name, data in files
                )
                + f"--{boundary}--\r\n".encode()
            )
        request = urllib.request.Request(f"{self.url}{path}?{query}", body, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            error = json.loads(exc.read() or b"{}")
            if exc.code == 404 and method == "DELETE":
                return error
            sys.exit(f"{method} {path}: HTTP {exc.code} {error.get('error')}: {error.get('message')}")

    def class_path(self, label: str) -> str:
        return "/v1/classes/" + urllib.parse.quote(label, safe="")


def folder_images(folder: Path) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"no images in {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("FEWSHOT_URL", "http://localhost:8000"))
    parser.add_argument("--namespace", default="quickstart", help="kept apart from your other classes")
    parser.add_argument("--class", dest="classes", action="append", default=[], metavar="LABEL=FOLDER")
    parser.add_argument("--query", action="append", default=[], type=Path, help="an image to classify")
    args = parser.parse_args()
    api = Api(args.url, os.environ.get("FEWSHOT_API_KEY"), args.namespace)

    info = api.call("GET", "/v1/info")
    print(f"server {info['version']}, model {info['model_id']} ({info['precision']})")
    if args.classes:
        shots = {
            label: folder_images(Path(folder)) for label, folder in (c.split("=", 1) for c in args.classes)
        }
        queries = [(p.name, p.read_bytes()) for p in args.query]
    else:
        shots = {
            "red discs": [(f"red{i}.png", red_discs(i)) for i in range(SHOTS)],
            "blue stripes": [(f"blue{i}.png", blue_stripes(i)) for i in range(SHOTS)],
        }
        queries = [
            ("new red discs", red_discs(7)),
            ("new blue stripes", blue_stripes(9)),
            ("grey noise (neither)", grey_noise(3)),
        ]

    for label, images in shots.items():
        api.call("DELETE", api.class_path(label))  # start afresh (404 when it is not there)
        added = api.call("POST", api.class_path(label) + "/examples", files=images)
        print(f"class {label!r}: {added['count']} examples")

    answer = api.call("POST", "/v1/classify", files=queries, top_k=3)
    # "results" holds each image's ranked classes; "unknown", beside it, one flag per image: true
    # when the image matches none of the classes well enough (open set, calibrated per namespace).
    for (name, _), predictions, unknown in zip(queries, answer["results"], answer["unknown"]):
        ranked = ", ".join(f"{p['label']} {p['score']:.3f}" for p in predictions)
        print(f"{name}: {'unknown' if unknown else predictions[0]['label']}  ({ranked})")


if __name__ == "__main__":
    main()
