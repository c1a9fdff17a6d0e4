"""The MSN criterion on tiny hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot_trainer.loss import msn_loss, prototype_logits, sharpen, sinkhorn, smoothed_probs
from fewshot_trainer.model import MSNEncoder, ProjectionHead, init_prototypes
from fewshot_trainer.vit import build_vit, get_arch


def test_sharpening_equals_softmax_at_tau_times_t_and_is_sharper() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.3, 0.2, 0.1, 0.0]])
    tau, t = 0.1, 0.25
    probs = F.softmax(logits / tau, dim=1)
    sharp = sharpen(probs, t)
    torch.testing.assert_close(sharp, F.softmax(logits / (tau * t), dim=1))
    assert torch.all(sharp.max(dim=1).values > probs.max(dim=1).values)
    entropy = lambda p: -torch.special.xlogy(p, p).sum(dim=1)  # noqa: E731
    assert torch.all(entropy(sharp) < entropy(probs))


def test_prototype_logits_are_cosine_similarities_over_tau() -> None:
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    protos = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    expected = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]]) / 0.5
    torch.testing.assert_close(prototype_logits(z, protos, 0.5), expected)


def _loss(anchor: torch.Tensor, target: torch.Tensor, protos: torch.Tensor, **kw):
    defaults = dict(
        temperature=0.1,
        sharpen_temperature=0.25,
        memax_weight=1.0,
        use_sinkhorn=False,
        sinkhorn_iterations=3,
        label_smoothing=0.0,
    )
    return msn_loss(anchor, target, protos, **{**defaults, **kw})


def test_memax_is_zero_for_uniform_mean_and_log_k_for_one_hot_mean() -> None:
    k = 4
    protos = torch.eye(k)
    # Anchors pointing at each prototype in turn: mean prediction is exactly uniform.
    anchors = torch.eye(k) * 100.0
    parts = _loss(anchors, anchors, protos, temperature=0.001)
    assert parts.memax.item() == pytest.approx(0.0, abs=1e-5)
    # Every anchor on prototype 0: mean prediction is one-hot, ME-MAX = log K (its maximum).
    same = torch.tensor([[1.0, 0, 0, 0]]).repeat(k, 1)
    parts = _loss(same, same, protos, temperature=0.001)
    assert parts.memax.item() == pytest.approx(math.log(k), abs=1e-4)
    assert parts.total.item() == pytest.approx(parts.ce.item() + parts.memax.item(), abs=1e-6)


def test_cross_entropy_matches_hand_computation_and_repeats_targets_over_views() -> None:
    torch.manual_seed(0)
    batch, views, dim, k = 3, 2, 5, 6
    anchors, target, protos = torch.randn(batch * views, dim), torch.randn(batch, dim), torch.randn(k, dim)
    parts = _loss(anchors, target, protos, memax_weight=0.0)
    p_t = F.softmax(prototype_logits(target, protos, 0.1 * 0.25), dim=1)
    log_p = F.log_softmax(prototype_logits(anchors, protos, 0.1), dim=1)
    expected = -(torch.cat([p_t, p_t]) * log_p).sum(dim=1).mean()
    torch.testing.assert_close(parts.ce, expected)
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_label_smoothing_mixes_in_the_uniform_distribution() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(smoothed_probs(probs, 0.2), torch.tensor([[0.85, 0.05, 0.05, 0.05]]))


def test_sinkhorn_balances_prototype_usage() -> None:
    torch.manual_seed(0)
    probs = F.softmax(torch.randn(64, 8) * 3 + torch.tensor([4.0] + [0.0] * 7), dim=1)
    balanced = sinkhorn(probs, iterations=50)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(balanced.mean(dim=0), torch.full((8,), 1 / 8), atol=1e-3, rtol=0)
    assert probs.mean(dim=0)[0] > 0.3  # it really was unbalanced (uniform: 0.125)


def test_gradients_reach_anchor_encoder_and_prototypes_but_not_the_target() -> None:
    torch.manual_seed(0)
    spec = get_arch("vit_test_p8_32")
    online = MSNEncoder(build_vit(spec, dynamic_img_size=True), ProjectionHead(spec.embed_dim, 32, 16))
    target = MSNEncoder(build_vit(spec, dynamic_img_size=True), ProjectionHead(spec.embed_dim, 32, 16))
    protos = init_prototypes(8, 16)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)]
    target_z = target([views[0]])  # deliberately NOT under no_grad: the loss must cut it itself
    anchor_z = online(views[1:], keep=torch.tensor([0, 3, 5, 9, 12]))
    parts = msn_loss(anchor_z, target_z, protos)
    parts.total.backward()
    assert protos.grad is not None and protos.grad.abs().sum() > 0
    assert online.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert online.head.fc3.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())
