"""Image files on disk -> model input, the one way the server would see them.

``fewshot eval``, the exporter's centring/whitening sample, the trainer's data and its few-shot
probe all list folders and read files here, so they agree on which files count as images, their
order, how unreadable files are handled and how pixels are preprocessed (the server's own
:func:`images.decode_image` and :func:`images.preprocess`). They decode in this process: the
files are the user's own, on their disk. Bytes from the network go through the server's isolated
decode workers instead (fewshot_service.core.decode_pool).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FewshotError, ImageError
from .images import DRAFT_FACTOR, ImageLimits, decode_image, preprocess
from .modelmeta import Preprocess

# Every extension some installed Pillow plugin claims to read (lower case, with the dot).
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_image_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``root`` (recursive), sorted so runs are reproducible."""
    return sorted(p for p in Path(root).rglob("*") if is_image_file(p))


@dataclass(frozen=True)
class LabelledFiles:
    """A folder-per-class set: ``paths[i]`` belongs to ``classes[labels[i]]``."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]


def list_labelled_image_files(
    root: str | os.PathLike[str], max_per_class: int | None = None
) -> LabelledFiles:
    """``root/<class>/**/<image>``; classes sorted by name, at most ``max_per_class`` files each
    (the first in name order). Class folders without images keep their label but add no file."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = list_image_files(root / name)[:max_per_class]
        paths += files
        labels += [label] * len(files)
    return LabelledFiles(paths, np.asarray(labels, dtype=np.int64), classes)


def read_image_file(
    path: str | os.PathLike[str], index: int, pre: Preprocess, limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """One file decoded and preprocessed exactly as the server does an upload: ``[3, S, S]``.

    Raises :class:`errors.ImageError` naming the file (``index`` is its position in the caller's
    list), :class:`errors.TooLarge` over ``limits``, ``OSError`` when it cannot be read.
    """
    data = Path(path).read_bytes()
    try:
        img = decode_image(data, index, limits, min_short_side=DRAFT_FACTOR * pre.resize_size)
    except ImageError as exc:
        raise ImageError(index, f"{path}: {exc.reason}") from None
    return preprocess(img, pre)


def preprocessed_batches(
    paths: Iterable[str | os.PathLike[str]],
    pre: Preprocess,
    batch_size: int,
    *,
    limits: ImageLimits = ImageLimits(),
    skip_unreadable: bool = False,
) -> Iterator[tuple[np.ndarray, list[int]]]:
    """``(pixels [n, 3, S, S], positions in paths)`` for up to ``batch_size`` files at a time.

    With ``skip_unreadable`` a file that cannot be read or decoded is left out (the positions
    show which), as a data set with a few broken files must still be usable; otherwise the
    first such file raises (see :func:`read_image_file`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pixels: list[np.ndarray] = []
    positions: list[int] = []
    for index, path in enumerate(paths):
        try:
            pixels.append(read_image_file(path, index, pre, limits))
        except (FewshotError, OSError):
            if not skip_unreadable:
                raise
            continue
        positions.append(index)
        if len(pixels) == batch_size:
            yield np.stack(pixels), positions
            pixels, positions = [], []
    if pixels:
        yield np.stack(pixels), positions
