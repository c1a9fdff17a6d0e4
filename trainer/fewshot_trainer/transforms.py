"""The MSN views of one image: 1 target, 1 anchor (masked later, in the model), M focal anchors.

Augmentations follow the reference (msn.md §1): RandomResizedCrop (0.3-1 random, 0.05-0.3 focal),
horizontal flip, colour jitter (0.8s/0.8s/0.8s/0.2s, p=0.8), grayscale p=0.2, PIL Gaussian blur
p=0.5 with radius U(0.1, 2), normalisation. All randomness comes from torch's global RNG, so a
caller can make a sample's views reproducible by seeding it (see ``data.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T


class RandomPILGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius drawn uniformly (torch RNG, not ``random``)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def view_transform(
    size: int,
    scale: tuple[float, float],
    color_jitter_strength: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> T.Compose:
    s = color_jitter_strength
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            T.RandomGrayscale(p=0.2),
            RandomPILGaussianBlur(p=0.5),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class MSNViews:
    """``img -> [target, anchor, focal_1..focal_M]``: two random views, then M focal views."""

    def __init__(
        self,
        random_size: int,
        focal_size: int,
        focal_views: int,
        random_scale: tuple[float, float] = (0.3, 1.0),
        focal_scale: tuple[float, float] = (0.05, 0.3),
        color_jitter_strength: float = 0.5,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        self.random = view_transform(random_size, random_scale, color_jitter_strength, mean, std)
        self.focal = view_transform(focal_size, focal_scale, color_jitter_strength, mean, std)
        self.focal_views = focal_views

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        views = [self.random(img), self.random(img)]
        views += [self.focal(img) for _ in range(self.focal_views)]
        return views
