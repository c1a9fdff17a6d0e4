"""Random patch masking for the anchor view: which patch tokens survive.

MSN drops masked tokens outright (they never enter the transformer). Like the reference we draw
ONE random subset per batch, shared by every image in it: the kept tokens then form a dense
``[B, n_keep, D]`` tensor with one ``index_select``, no per-sample gather or padding, and the
reference recipe's results were obtained this way.
"""

from __future__ import annotations

import math

import torch


def num_kept(num_patches: int, ratio: float) -> int:
    """``floor(N * (1 - ratio))``, as the reference; at least one patch survives."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, math.floor(num_patches * (1.0 - ratio) + 1e-9))


def random_keep_indices(
    num_patches: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sorted indices (into the patch grid, CLS excluded) of the patches kept for this batch."""
    perm = torch.randperm(num_patches, generator=generator)
    return perm[: num_kept(num_patches, ratio)].sort().values
