"""The EMA target network: ``target = m * target + (1 - m) * online``, parameters only.

Buffers (BatchNorm running stats) are not averaged, as in the reference: the target updates its
own from the target views it sees.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks differ in structure")
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, [p.detach() for p in online_params], alpha=1.0 - momentum)
