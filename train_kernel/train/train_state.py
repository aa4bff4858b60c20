"""The counters of a run that a checkpoint saves and a resume restores."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    batch_count: int = 0  # batches trained on or skipped for overflow: the log's `step`
    step_count: int = 0  # successful optimizer updates: drives the lr and beta2 schedules
    inf_nan_skip_batches: int = 0
    num_consumed_tokens: int = 0
