"""Views, augmentations and the image folder they are read from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_trainer.data import EpochIndexSampler, UnlabelledImages
from fewshot_trainer.transforms import MSNViews, RandomPILGaussianBlur


def _views(focal: int = 3) -> MSNViews:
    return MSNViews(random_size=32, focal_size=16, focal_views=focal)


def _write_images(folder: Path, count: int, mode: str = "RGB", ext: str = "jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"img{i:03d}.{ext}")


def test_views_are_target_anchor_then_focal_at_their_sizes() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    views = _views(focal=3)(img)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert not torch.equal(views[0], views[1])  # two independent random views


def test_views_are_reproducible_from_the_seed() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    torch.manual_seed(7)
    first = _views()(img)
    torch.manual_seed(7)
    second = _views()(img)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_blur_probability_and_effect() -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    always = RandomPILGaussianBlur(p=1.0)(img)
    never = RandomPILGaussianBlur(p=0.0)(img)
    assert never is img
    assert np.asarray(always).std() < np.asarray(img).std()  # blurring smooths noise


def test_dataset_reads_recursively_converts_modes_and_seeds_per_epoch_and_index(tmp_path: Path) -> None:
    _write_images(tmp_path / "a", 3, "RGB", "jpg")
    _write_images(tmp_path / "b" / "deep", 2, "L", "png")
    _write_images(tmp_path / "c", 2, "CMYK", "jpg")
    data = UnlabelledImages(tmp_path, _views(focal=1), seed=3)
    assert len(data) == 7 and data.skipped == []
    for index in range(len(data)):
        views = data[(0, index)]
        assert views[0].shape == (3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(data[(0, 2)], data[(0, 2)]))
    assert not torch.equal(data[(0, 2)][0], data[(1, 2)][0])  # a new epoch, new augmentations
    # Reading a sample leaves the global RNG alone (mask draws and the like are unaffected).
    state = torch.get_rng_state()
    data[(0, 1)]
    assert torch.equal(state, torch.get_rng_state())


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    _write_images(tmp_path, 4)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    data = UnlabelledImages(tmp_path, _views(focal=1))
    assert len(data) == 4
    assert sorted(p.name for p in data.skipped) == ["broken.jpg", "empty.png"]


def test_truncated_file_is_replaced_by_the_next_image_not_a_crash(tmp_path: Path) -> None:
    _write_images(tmp_path, 3)
    good = (tmp_path / "img000.jpg").read_bytes()
    (tmp_path / "img000.jpg").write_bytes(good[: len(good) // 2])  # header fine, data cut
    data = UnlabelledImages(tmp_path, _views(focal=1))
    views = data[(0, 0)]
    assert views[0].shape == (3, 32, 32)


def test_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no readable images"):
        UnlabelledImages(tmp_path, _views())


def test_sampler_partitions_ranks_and_skips_done_batches() -> None:
    kw = dict(epoch=2, seed=0, world_size=2, batch_size=4)
    rank0 = list(EpochIndexSampler(21, rank=0, **kw))
    rank1 = list(EpochIndexSampler(21, rank=1, **kw))
    assert len(rank0) == len(rank1) == 8  # 10 per rank, 2 full batches of 4
    assert not {i for _, i in rank0} & {i for _, i in rank1}
    assert all(epoch == 2 for epoch, _ in rank0)
    resumed = list(EpochIndexSampler(21, rank=0, skip_batches=1, **kw))
    assert resumed == rank0[4:]
    assert list(EpochIndexSampler(21, rank=0, **{**kw, "epoch": 3})) != rank0
