"""When a run has gone wrong without crashing: a loss far above its recent median for several
steps (a loss spike), or too many consecutive optimizer steps skipped for inf/nan gradients."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Spike:
    loss: float
    median: float
    steps: int  # consecutive spiking steps so far

    def describe(self) -> str:
        return (
            f"loss {self.loss:.4g} above {self.loss / self.median:.2f} x the running median "
            f"{self.median:.4g} for {self.steps} step(s)"
        )


class LossSpikeDetector:
    """The loss is spiking when it exceeds `factor` x the median of the last `window` normal losses
    for `steps` consecutive steps. A median (not a mean) so that one outlier does not move the bar;
    spiking and non-finite losses never enter the window. Needs a full window before it judges."""

    def __init__(self, factor: float, window: int, steps: int = 1) -> None:
        if factor <= 1 or window < 1 or steps < 1:
            raise ValueError(f"need factor > 1, window >= 1, steps >= 1; got {factor}, {window}, {steps}")
        self.factor = factor
        self.steps = steps
        self.history: deque[float] = deque(maxlen=window)
        self.streak = 0

    def update(self, loss: float) -> Spike | None:
        """Feeds one step's loss; returns the spike when this step completes `steps` spiking steps."""
        if not math.isfinite(loss):
            return None  # the non-finite streak's business
        if len(self.history) == self.history.maxlen:
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                self.streak += 1
                if self.streak >= self.steps:
                    spike = Spike(loss, median, self.streak)
                    self.streak = 0
                    return spike
                return None
        self.streak = 0
        self.history.append(loss)
        return None

    def reset_streak(self) -> None:
        """After a rollback: the steps counted towards a spike are undone (the history stays)."""
        self.streak = 0


class SkipStreak:
    """Consecutive optimizer steps skipped for inf/nan gradients; `update` says when the streak
    reaches `limit` (0: never)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def update(self, skipped: bool) -> bool:
        self.count = self.count + 1 if skipped else 0
        if self.limit > 0 and self.count >= self.limit:
            self.count = 0
            return True
        return False
