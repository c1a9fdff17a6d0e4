"""Process-group helpers for torchrun (gloo on CPU, NCCL on GPU); all no-ops in one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
