"""Masked tokens are dropped before the blocks; focal views run on their own grid."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from fewshot_trainer.masking import num_kept, random_keep_indices
from fewshot_trainer.model import MSNEncoder, ProjectionHead, embed_tokens, forward_cls
from fewshot_trainer.vit import build_vit, get_arch


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_vit(get_arch("vit_test_p8_32"), dynamic_img_size=True).eval()


@pytest.mark.parametrize(
    ("patches", "ratio", "kept"),
    [(196, 0.15, 166), (196, 0.3, 137), (1024, 0.7, 307), (3136, 0.7, 940), (64, 0.3, 44), (16, 0.0, 16)],
)
def test_visible_token_counts_match_the_reference(patches: int, ratio: float, kept: int) -> None:
    assert num_kept(patches, ratio) == kept == math.floor(patches * (1 - ratio) + 1e-9)
    keep = random_keep_indices(patches, ratio, torch.Generator().manual_seed(1))
    assert keep.numel() == kept and keep.unique().numel() == kept
    assert keep.min() >= 0 and keep.max() < patches


def test_bad_ratio_is_rejected() -> None:
    with pytest.raises(ValueError, match="mask ratio"):
        num_kept(16, 1.0)


def test_blocks_see_only_cls_and_kept_tokens(vit) -> None:
    seen: list[torch.Size] = []
    hook = vit.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    keep = random_keep_indices(16, 0.5, torch.Generator().manual_seed(0))
    try:
        out = forward_cls(vit, torch.randn(3, 3, 32, 32), keep)
    finally:
        hook.remove()
    assert seen == [torch.Size([3, 1 + 8, 64])]
    assert out.shape == (3, 64)


def test_kept_tokens_carry_their_own_position_embeddings_and_cls_is_kept(vit) -> None:
    images = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([1, 6, 11, 15])
    captured: list[torch.Tensor] = []
    hook = vit.blocks[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            forward_cls(vit, images, keep)
    finally:
        hook.remove()
    full = embed_tokens(vit, images)  # the unmasked tokens before the blocks
    torch.testing.assert_close(captured[0][:, 0], full[:, 0])  # CLS, with its position
    torch.testing.assert_close(captured[0][:, 1:], full[:, 1 + keep])


def test_no_mask_equals_timm_forward(vit) -> None:
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(forward_cls(vit, images), vit(images))


def test_focal_views_use_their_own_grid_with_resampled_positions(vit) -> None:
    focal = torch.randn(2, 3, 16, 16)  # a 2x2 patch grid
    with torch.no_grad():
        tokens = embed_tokens(vit, focal)
        assert tokens.shape == (2, 1 + 4, 64)
        pos = resample_abs_pos_embed(vit.pos_embed, (2, 2), num_prefix_tokens=1)
        patches = vit.patch_embed(focal).reshape(2, 4, 64)
        torch.testing.assert_close(tokens[:, 1:], patches + pos[:, 1:])
        assert forward_cls(vit, focal).shape == (2, 64)


def test_encoder_masks_only_the_first_view_batch(vit) -> None:
    encoder = MSNEncoder(vit, ProjectionHead(64, 32, 16))
    lengths: list[int] = []
    hook = vit.blocks[0].register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    anchor, focal_a, focal_b = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    try:
        z = encoder([anchor, focal_a, focal_b], keep=torch.tensor([0, 2, 4]))
    finally:
        hook.remove()
    assert lengths == [1 + 3, 1 + 4]  # masked anchor; both focal views together, unmasked
    assert z.shape == (12, 16)


def test_masking_keeps_timm_state_dict_keys(vit) -> None:
    plain = build_vit(get_arch("vit_test_p8_32"))
    assert plain.load_state_dict(vit.state_dict(), strict=True) is not None
