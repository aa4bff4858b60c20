"""InternLM's learning-rate schedule (linear warmup, then cosine to eta_min) and its beta2 schedule.

Both are pure functions of the step, so resuming needs only the step counter. Step s is the
optimizer step being taken, counted from 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosineLR:
    base_lr: float
    total_steps: int
    warmup_ratio: float = 0.0
    eta_min: float = 0.0
    init_steps: int = 0
    """Optimizer warm-up steps with lr 0 before the linear warmup starts (InternLM's init_steps)."""

    @property
    def warmup_steps(self) -> int:
        return int(self.total_steps * self.warmup_ratio)

    def lr_at(self, step: int) -> float:
        step = step - self.init_steps
        if step < 0:
            return 0.0
        warmup = self.warmup_steps
        if step < warmup:
            return self.base_lr * (step + 1) / warmup
        cosine_steps = max(self.total_steps - warmup, 1)
        progress = min(step - warmup, cosine_steps) / cosine_steps
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class Beta2Schedule:
    """beta2 = max(init_beta2, 1 - 1 / t**c) at optimizer step t (1-based); c <= 0 keeps init_beta2."""

    init_beta2: float
    c: float = 0.0

    def beta2_at(self, step: int) -> float:
        if self.c <= 0:
            return self.init_beta2
        t = step + 1
        return max(self.init_beta2, 1 - 1 / t**self.c)
