"""The MSN networks: a timm ViT that drops masked tokens, the projection head, the prototypes.

The timm ``VisionTransformer`` is used as built (never re-initialised) and its state dict keeps
timm's keys, so checkpoints load into ``build_vit`` for export and official weights load here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def embed_tokens(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch-embed ``images`` and add position embeddings: ``[B, 1 + H*W, D]``, CLS first.

    Views smaller than the model's size (focal views) get the position embedding resampled to
    their own grid, so each token carries the position of the patch it came from.

    This is timm's position-embedding step written with public attributes, not its private
    ``_pos_embed``: MSN drops one shared subset of tokens between it and the blocks, which neither
    ``forward_features`` nor ``forward_intermediates`` allows (timm's ``patch_drop`` draws a
    random subset per image, at a rate fixed when the model is built).
    """
    tokens = vit.patch_embed(images)
    if tokens.ndim == 4:  # NHWC, from a model built with dynamic_img_size=True
        batch, height, width, dim = tokens.shape
        tokens = tokens.reshape(batch, height * width, dim)
    else:
        patch = vit.patch_embed.patch_size
        height, width = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
    pos = vit.pos_embed
    if pos.shape[1] != 1 + height * width:
        pos = resample_abs_pos_embed(pos, (height, width), num_prefix_tokens=1)
    cls = (vit.cls_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
    return torch.cat([cls, tokens + pos[:, 1:]], dim=1)


def forward_cls(
    vit: VisionTransformer, images: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """CLS after the final norm, running the blocks on CLS + the ``keep`` patch tokens only."""
    tokens = embed_tokens(vit, images)
    if keep is not None:
        # Masked patches are dropped here, before any block: they cost nothing downstream.
        index = torch.cat([keep.new_zeros(1), keep + 1]).to(tokens.device)
        tokens = tokens.index_select(1, index)
    tokens = vit.norm_pre(tokens)
    tokens = vit.blocks(tokens)
    tokens = vit.norm(tokens)
    return tokens[:, 0]


class ProjectionHead(nn.Module):
    """Linear-BN-GELU, Linear-BN-GELU, Linear, all with bias: the reference ``fc`` module's names."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.bn2 = nn.BatchNorm1d(hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(self.fc1(x)))
        x = F.gelu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class MSNEncoder(nn.Module):
    """Backbone + head over a list of view batches; returns projections of all views, stacked.

    Views of one size are encoded together (the reference groups by resolution too); ``keep``
    masks the first view batch, the random anchor, and ``focal_keep`` (optional, indices into
    the focal grid) the others: the reference masks the anchor only (``masking.focal``).
    """

    def __init__(self, backbone: VisionTransformer, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        views: list[torch.Tensor],
        keep: torch.Tensor | None = None,
        focal_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cls = [forward_cls(self.backbone, views[0], keep)]
        if len(views) > 1:
            cls.append(forward_cls(self.backbone, torch.cat(views[1:]), focal_keep))
        return self.head(torch.cat(cls))


def init_prototypes(num_prototypes: int, dim: int) -> nn.Parameter:
    """K learnable prototypes, uniform in +-1/sqrt(dim) (reference init)."""
    bound = 1.0 / math.sqrt(dim)
    return nn.Parameter(torch.empty(num_prototypes, dim).uniform_(-bound, bound))
