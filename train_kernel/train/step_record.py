"""The record of each training step (InternLM's log line fields, in its order, and what
metrics.jsonl keeps), and the run's closing summary line. What spans steps lives here: the step
time's moving average for the ETA, the tgs/* windows, every step's loss."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from train_kernel.config import TrainConfig
from train_kernel.flops import flops_per_step, tflops
from train_kernel.optim.hybrid_adamw import StepResult
from train_kernel.parallel.process_groups import ParallelContext
from train_kernel.train.builder import Optimization
from train_kernel.train.step import StepLoss
from train_kernel.train.tgs_stats import TgsStats
from train_kernel.train.token_metrics import TokenMetrics
from train_kernel.train.train_state import TrainState

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StepFigures:
    """What one step measured. `loss` and `tokens` are the whole job's (loss averaged, tokens summed
    over data parallel); the micro-batch shapes in `step_loss` are this rank's."""

    step_loss: StepLoss
    loss: float
    tokens: int
    result: StepResult
    micro_num: int
    seconds: float
    fwd_bwd_seconds: float
    data_wait_seconds: float


class StepRecords:
    def __init__(
        self, *, config: TrainConfig, parallel: ParallelContext, optim: Optimization, counters: TrainState
    ) -> None:
        self.config, self.parallel, self.optim, self.state = config, parallel, optim, counters
        self.tgs = TgsStats()  # the tgs/* windows of the log line
        self.step_seconds_ema: float | None = None
        self.losses: list[float] = []  # every step's loss, for the closing summary
        self.started = time.perf_counter()

    def record(self, step: StepFigures, metrics: TokenMetrics) -> dict[str, Any]:
        """The step's fields (counters as they stand after the step's update): loss, tokens, tgs and
        tflops for the whole job; micro_num and the batch shape fields are this rank's."""
        state, world_size = self.state, self.parallel.world_size
        ema = self.step_seconds_ema
        self.step_seconds_ema = step.seconds if ema is None else 0.9 * ema + 0.1 * step.seconds
        self.losses.append(step.loss)
        segments = step.step_loss.segments_per_micro_batch
        flops = flops_per_step(self.config, self.parallel.dp_size, step.micro_num)
        record = {
            "tflops": tflops(flops, step.seconds, world_size),
            "step": state.batch_count,
            "loss": step.loss,
            "tgs": round(step.tokens / world_size / step.seconds, 2),
            **self.tgs.update(step.tokens / world_size, step.seconds),
            "lr": self.optim.lr.lr_at(state.step_count),
            # After the scaler's update, as InternLM logs it.
            "loss_scale": float(self.optim.optimizer.scaler.scale),
            "grad_norm": {"0_default": step.result.grad_norm},
            "micro_num": step.micro_num,
            "num_consumed_tokens": state.num_consumed_tokens,
            "inf_nan_skip_batches": state.inf_nan_skip_batches,
            "num_samples_in_batch": sum(segments),
            "largest_length": step.step_loss.largest_length,
            "largest_batch": max(segments),
            "smallest_batch": min(segments),
            "adam_beta2": self.optim.beta2.beta2_at(state.step_count),
            "fwd_bwd_time": round(step.fwd_bwd_seconds, 2),
        }
        record.update(metrics.summary())
        remaining = self.config.data.total_steps - state.batch_count - 1
        record["eta_s"] = round(remaining * self.step_seconds_ema, 1)
        record["data_wait_s"] = round(step.data_wait_seconds, 6)
        return record

    def summarise(self) -> None:
        """One closing line: how far the loss went, so a run's outcome shows without a plot."""
        if not self.losses:
            return
        window = max(1, min(10, len(self.losses) // 4))
        first = sum(self.losses[:window]) / window
        last = sum(self.losses[-window:]) / window
        log.info(
            "finished %d steps in %.0f s: loss %.3f (mean of the first %d steps) -> %.3f (last %d); "
            "%d tokens; %d steps skipped for inf/nan",
            len(self.losses),
            time.perf_counter() - self.started,
            first,
            window,
            last,
            window,
            self.state.num_consumed_tokens,
            self.state.inf_nan_skip_batches,
        )
