"""Process-group helpers for torchrun (gloo on CPU, NCCL on GPU); all no-ops in one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the torchrun process group if there is one; return this process's device."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceMean(torch.autograd.Function):
    """Mean over ranks; the gradient passes through unchanged.

    Every rank computes the same loss from the mean, and DDP then averages gradients over ranks,
    so passing ``grad`` through (not ``grad / W``) yields the gradient of the global objective.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x / world_size()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def all_reduce_mean_keep_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceMean.apply(x) if world_size() > 1 else x


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
    return x


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics span every rank, for CPU (gloo) training.

    torch's ``SyncBatchNorm`` accepts only GPU tensors. Sums go through the autograd-aware
    ``all_reduce``, so gradients flow back into every rank's inputs like ``SyncBatchNorm``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        x32 = x.float()
        channels = x32.shape[1]
        local = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_full((1,), x32.shape[0])])
        total = dist_nn.all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * count / (count - 1).clamp_min(1)
            factor = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_(unbiased.detach(), factor)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every ``BatchNorm1d`` for a :class:`GlobalBatchNorm1d` holding the same state."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        replacement = GlobalBatchNorm1d(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        for p_new, p_old in zip(replacement.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_batchnorm(child))
    return module


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch when world > 1 (the reference converts both encoders)."""
    if world_size() == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_to_global_batchnorm(module)
