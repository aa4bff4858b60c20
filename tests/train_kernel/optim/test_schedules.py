"""lr and beta2 at chosen steps against InternLM's formulas."""

from __future__ import annotations

import math

import pytest

from train_kernel.optim.schedules import Beta2Schedule, WarmupCosineLR


def test_lr_matches_seed_log_and_cosine():
    # The seed: lr=1e-4, 50000 steps, warmup_ratio 0.01 -> 500 warmup steps. Its log prints the lr
    # after the scheduler stepped: 4e-7 at step 0, 6e-7 at step 1, ...
    schedule = WarmupCosineLR(base_lr=1e-4, total_steps=50000, warmup_ratio=0.01, eta_min=1e-5)
    assert [schedule.lr_at(s + 1) for s in range(5)] == pytest.approx([4e-7, 6e-7, 8e-7, 1e-6, 1.2e-6])
    assert schedule.lr_at(499) == pytest.approx(1e-4)
    middle = 500 + (50000 - 500) // 2
    assert schedule.lr_at(middle) == pytest.approx(1e-5 + (1e-4 - 1e-5) * (1 + math.cos(math.pi * 0.5)) / 2)
    assert schedule.lr_at(50000) == pytest.approx(1e-5)
    assert schedule.lr_at(60000) == pytest.approx(1e-5)


def test_lr_init_steps_hold_zero():
    schedule = WarmupCosineLR(base_lr=1.0, total_steps=100, warmup_ratio=0.1, init_steps=3)
    assert [schedule.lr_at(s) for s in range(5)] == pytest.approx([0, 0, 0, 0.1, 0.2])


def test_beta2_schedule():
    assert Beta2Schedule(0.95, c=0).beta2_at(10) == 0.95
    schedule = Beta2Schedule(0.95, c=0.8)
    assert schedule.beta2_at(0) == 0.95  # 1 - 1/1 = 0 < 0.95
    assert schedule.beta2_at(99) == pytest.approx(max(0.95, 1 - 1 / 100**0.8))
    assert schedule.beta2_at(10**6) > 0.99
