"""Named ViT architectures and the factory that builds them as timm ``VisionTransformer``s.

The MSN reference backbone (``deit.py``) is timm's ViT: class token, learnable absolute position
embedding, ``qkv_bias=True``, LayerNorm eps 1e-6. Building it with ``num_classes=0`` and
``global_pool='token'`` makes ``model(x)`` return the CLS token after the final norm, which is the
embedding we export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class ArchSpec:
    """Shape of a ViT. ``num_heads`` never shows in tensor shapes, so it must be stated, not guessed."""

    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ArchSpec:
        return cls(**raw)


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        # Small enough for unit tests: builds and runs in milliseconds.
        ArchSpec("vit_test_p8_32", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
        # CPU-trainable models for 64 px data (the default model is trained with one of these).
        ArchSpec("vit_tiny_p8_64", img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3),
        # Half the depth: about twice the images per second, for CPU budgets of an hour or two.
        ArchSpec("vit_tiny_d6_p8_64", img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3),
        ArchSpec("vit_small_p8_64", img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6),
        # The paper's models (MSN, Assran et al. 2022), at 224 px.
        ArchSpec("vit_small_p16_224", img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
        ArchSpec("vit_base_p16_224", img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
        ArchSpec("vit_base_p4_224", img_size=224, patch_size=4, embed_dim=768, depth=12, num_heads=12),
        ArchSpec("vit_large_p16_224", img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
        ArchSpec("vit_large_p7_224", img_size=224, patch_size=7, embed_dim=1024, depth=24, num_heads=16),
    )
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHS))}") from None


def build_vit(spec: ArchSpec, *, dynamic_img_size: bool = False) -> VisionTransformer:
    """A timm ViT that returns the CLS embedding after the final norm.

    ``dynamic_img_size=True`` lets the model take other resolutions (focal views) by resampling
    the position embedding; export uses ``False`` so the graph has no interpolation in it.
    """
    return VisionTransformer(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        class_token=True,
        dynamic_img_size=dynamic_img_size,
    )
