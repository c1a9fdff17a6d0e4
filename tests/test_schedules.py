"""Learning-rate, weight-decay and EMA-momentum schedules (reference shapes, 1.25x horizon)."""

from __future__ import annotations

import math

import pytest

from fewshot_trainer.schedules import ema_momentum, learning_rate, weight_decay

LR = dict(total_steps=1000, warmup_steps=100, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6)


def test_lr_warms_up_linearly_then_follows_the_stretched_cosine() -> None:
    assert learning_rate(0, **LR) == pytest.approx(2e-4)
    assert learning_rate(50, **LR) == pytest.approx(6e-4)
    assert learning_rate(100, **LR) == pytest.approx(1e-3)
    # End of the run: 900 of the 1150 cosine steps done, not the final lr (reference horizon).
    progress = 900 / (1.25 * 1000 - 100)
    expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress))
    assert learning_rate(1000, **LR) == pytest.approx(expected)
    assert learning_rate(1000, **LR) > 1e-5
    assert learning_rate(1000, **{**LR, "horizon": 1.0}) == pytest.approx(1e-6)
    values = [learning_rate(s, **LR) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_rises_on_a_cosine() -> None:
    kw = dict(total_steps=800, start_wd=0.04, final_wd=0.4, horizon=1.0)
    assert weight_decay(0, **kw) == pytest.approx(0.04)
    assert weight_decay(400, **kw) == pytest.approx(0.22)
    assert weight_decay(800, **kw) == pytest.approx(0.4)


def test_ema_momentum_is_linear_to_one_over_the_horizon() -> None:
    assert ema_momentum(0, total_steps=1000) == pytest.approx(0.996)
    assert ema_momentum(1000, total_steps=1000) == pytest.approx(0.996 + 0.004 / 1.25)
    assert ema_momentum(1000, total_steps=1000, horizon=1.0) == pytest.approx(1.0)
    assert ema_momentum(500, total_steps=1000, horizon=1.0) == pytest.approx(0.998)
