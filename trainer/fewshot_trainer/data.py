"""Unlabelled images from a folder tree, with reproducible per-sample views.

Every sample's augmentation randomness is derived from ``(seed, epoch, index)``, and each epoch's
order from ``(seed, epoch)`` (``DistributedSampler``), so a resumed run sees exactly the batches
an uninterrupted one would, whatever the number of loader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, DistributedSampler, Sampler

from fewshot_common.image_files import list_image_files

log = logging.getLogger(__name__)

_LOAD_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def find_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a directory")
    return list_image_files(root)


def load_rgb(path: Path) -> Image.Image:
    """Decode fully (so truncation shows here, not inside a transform) and convert to RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class UnlabelledImages(Dataset):
    """Images under ``root`` (recursive). Files Pillow cannot open are skipped and counted.

    Items are addressed by ``(epoch, index)`` pairs (see :class:`EpochIndexSampler`) and returned
    as the list of views ``transform`` makes from the image.
    """

    def __init__(
        self, root: str | Path, transform: Callable[[Image.Image], list[torch.Tensor]], seed: int = 0
    ) -> None:
        candidates = find_images(root)
        self.paths: list[Path] = []
        self.skipped: list[Path] = []
        for path in candidates:
            # A header check is cheap; a file that only fails to decode later is replaced then.
            try:
                with Image.open(path) as img:
                    img.verify()
                self.paths.append(path)
            except _LOAD_ERRORS:
                self.skipped.append(path)
        if not self.paths:
            raise ValueError(
                f"no readable images under {root} ({len(self.skipped)} unreadable files skipped)"
            )
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        epoch, index = key
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                img = load_rgb(path)
                break
            except _LOAD_ERRORS as exc:
                # Deterministic stand-in (the next file) keeps batch shapes and resume exact.
                log.warning("skipping unreadable image %s: %s", path, exc)
        else:
            raise RuntimeError("no image could be decoded")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img)


class EpochIndexSampler(Sampler[tuple[int, int]]):
    """``DistributedSampler`` order for one epoch, as ``(epoch, index)``, minus batches already done."""

    def __init__(
        self,
        dataset_len: int,
        *,
        epoch: int,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        skip_batches: int = 0,
    ) -> None:
        self.order = DistributedSampler(
            range(dataset_len),
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.order.set_epoch(epoch)
        self.epoch = epoch
        self.batch_size = batch_size
        self.skip = skip_batches * batch_size

    def batches_per_epoch(self) -> int:
        return len(self.order) // self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        usable = self.batches_per_epoch() * self.batch_size
        indices = list(self.order)[self.skip : usable]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() * self.batch_size - self.skip)
