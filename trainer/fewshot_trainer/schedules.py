"""Per-step schedules: LR warmup + cosine, cosine weight decay, linear EMA momentum.

As in the reference, the cosine and momentum horizons are ``horizon * total_steps`` (1.25 by
default), so a run ends about 80% of the way down the cosine (msn.md §1).
"""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    start_lr: float,
    ref_lr: float,
    final_lr: float,
    horizon: float = 1.25,
) -> float:
    if step < warmup_steps:
        return start_lr + (ref_lr - start_lr) * step / warmup_steps
    span = max(1.0, horizon * total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay(
    step: int, *, total_steps: int, start_wd: float, final_wd: float, horizon: float = 1.25
) -> float:
    progress = min(1.0, step / max(1.0, horizon * total_steps))
    return final_wd + (start_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(
    step: int, *, total_steps: int, start: float = 0.996, end: float = 1.0, horizon: float = 1.25
) -> float:
    progress = min(1.0, step / max(1.0, horizon * total_steps))
    return start + (end - start) * progress
