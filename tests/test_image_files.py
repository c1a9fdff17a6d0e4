"""``fewshot_common.image_files``: the one listing of image folders and the one way files are read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_common.errors import ImageError
from fewshot_common.image_files import (
    list_image_files,
    list_labelled_image_files,
    preprocessed_batches,
    read_image_file,
)
from fewshot_common.images import decode_image, preprocess
from fewshot_common.modelmeta import Preprocess
from fewshot_common.vectors import l2_normalize

PRE = Preprocess(input_size=16, resize_size=16)


def _image(path: Path, seed: int, size: tuple[int, int] = (20, 24), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def test_listing_is_recursive_sorted_and_only_image_extensions(tmp_path: Path) -> None:
    b = _image(tmp_path / "b.png", 0)
    a = _image(tmp_path / "z" / "a.JPG", 1, fmt="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()  # a folder with an image-like name is not a file
    assert list_image_files(tmp_path) == sorted([b, a])


def test_labelled_listing_sorts_classes_and_caps_per_class(tmp_path: Path) -> None:
    for name, count in (("dog", 3), ("cat", 2)):
        for i in range(count):
            _image(tmp_path / name / "sub" / f"{i}.png", i)
    (tmp_path / "empty").mkdir()
    found = list_labelled_image_files(tmp_path, max_per_class=2)
    assert found.classes == ["cat", "dog", "empty"]
    assert found.labels.tolist() == [0, 0, 1, 1]
    assert [p.parent.parent.name for p in found.paths] == ["cat", "cat", "dog", "dog"]


def test_files_are_read_exactly_as_the_server_reads_uploads_and_big_jpegs_drafted(
    tmp_path: Path,
) -> None:
    small = _image(tmp_path / "small.png", 2)
    big = _image(tmp_path / "big.jpg", 3, size=(300, 400), fmt="JPEG")
    for index, path in enumerate((small, big)):
        upload = decode_image(path.read_bytes(), index, min_short_side=2 * PRE.resize_size)
        np.testing.assert_array_equal(read_image_file(path, index, PRE), preprocess(upload, PRE))


def test_batches_skip_unreadable_files_or_name_the_first_one(tmp_path: Path) -> None:
    paths = [_image(tmp_path / f"{i}.png", i) for i in range(5)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths.insert(2, broken)
    batches = list(preprocessed_batches(paths, PRE, 2, skip_unreadable=True))
    assert [positions for _, positions in batches] == [[0, 1], [3, 4], [5]]
    assert [pixels.shape for pixels, _ in batches] == [(2, 3, 16, 16)] * 2 + [(1, 3, 16, 16)]
    with pytest.raises(ImageError, match=r"image 2: .*broken\.png: not a decodable image"):
        list(preprocessed_batches(paths, PRE, 2))


def test_l2_normalize_keeps_dtype_and_leaves_zero_rows_zero() -> None:
    rows = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(rows)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
