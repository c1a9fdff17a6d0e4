"""The EMA target update."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fewshot_trainer.ema import ema_update
from fewshot_trainer.model import ProjectionHead


def test_ema_update_formula_on_parameters_only() -> None:
    torch.manual_seed(0)
    online = ProjectionHead(4, 8, 3)
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online.bn1.running_mean.fill_(5.0)
    before = {n: p.clone() for n, p in target.named_parameters()}
    ema_update(target, online, momentum=0.9)
    for name, p in target.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(online.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    # BatchNorm buffers are the target's own (reference behaviour): untouched by the update.
    assert torch.all(target.bn1.running_mean == 0)


def test_momentum_one_freezes_and_zero_copies() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    frozen = target.weight.clone()
    ema_update(target, online, momentum=1.0)
    torch.testing.assert_close(target.weight, frozen)
    ema_update(target, online, momentum=0.0)
    torch.testing.assert_close(target.weight, online.weight)
