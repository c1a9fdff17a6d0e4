"""The MSN criterion: anchors predict the sharpened prototype assignment of the target view.

``p = softmax(cos(z, prototypes) / tau)`` for anchors; the target's p at tau sharpened by the
power 1/T (= softmax at tau*T), optionally balanced by Sinkhorn, repeated over the M anchor
views. Loss = CE(target, anchor) + lambda * ME-MAX, where ME-MAX = log K - H(mean anchor p),
the mean taken over every anchor on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import all_reduce_mean_keep_grad, world_size


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    memax: torch.Tensor
    target_probs: torch.Tensor  # [B, K], detached: for collapse diagnostics


def smoothed_probs(probs: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``probs @ proto_labels`` with the reference's smoothed one-hot labels, in closed form."""
    if label_smoothing == 0:
        return probs
    return (1.0 - label_smoothing) * probs + label_smoothing / probs.shape[1]


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).T / temperature


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    sharp = probs ** (1.0 / temperature)
    return sharp / sharp.sum(dim=1, keepdim=True)


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Rebalance a batch of assignments so prototypes are used equally (across all ranks)."""
    q = probs.T.clone()  # [K, B]
    num_prototypes, total_batch = q.shape[0], q.shape[1] * world_size()
    total = q.sum()
    _all_reduce_sum(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        _all_reduce_sum(rows)
        q /= rows * num_prototypes
        q /= q.sum(dim=0, keepdim=True) * total_batch
    return (q * total_batch).T


def _all_reduce_sum(x: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(x)


def msn_loss(
    anchor_z: torch.Tensor,
    target_z: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    temperature: float = 0.1,
    sharpen_temperature: float = 0.25,
    memax_weight: float = 1.0,
    use_sinkhorn: bool = True,
    sinkhorn_iterations: int = 3,
    label_smoothing: float = 0.0,
) -> LossParts:
    """``anchor_z``: ``[M*B, d]`` stacked by view; ``target_z``: ``[B, d]`` (gradient is cut)."""
    batch = target_z.shape[0]
    if anchor_z.shape[0] % batch:
        raise ValueError(f"{anchor_z.shape[0]} anchors is not a multiple of batch {batch}")
    num_views = anchor_z.shape[0] // batch
    # In fp32 even under bf16 autocast: softmax at tau*T = 0.025 needs the precision.
    anchor_z, target_z, prototypes = anchor_z.float(), target_z.float(), prototypes.float()

    probs = smoothed_probs(
        F.softmax(prototype_logits(anchor_z, prototypes, temperature), dim=1), label_smoothing
    )
    with torch.no_grad():
        target = smoothed_probs(
            F.softmax(prototype_logits(target_z.detach(), prototypes, temperature), dim=1),
            label_smoothing,
        )
        target = sharpen(target, sharpen_temperature)
        if use_sinkhorn:
            target = sinkhorn(target, sinkhorn_iterations)
    targets = target.repeat(num_views, 1)

    ce = -(targets * torch.log(probs.clamp_min(1e-30))).sum(dim=1).mean()
    mean_probs = all_reduce_mean_keep_grad(probs.mean(dim=0))
    memax = math.log(probs.shape[1]) + (mean_probs * torch.log(mean_probs.clamp_min(1e-30))).sum()
    return LossParts(total=ce + memax_weight * memax, ce=ce, memax=memax, target_probs=target)
