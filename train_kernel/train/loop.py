"""The training loop of one rank, over the parts train/builder.py made: each step takes its batch,
runs the step schedule's forwards and backwards and the optimizer, sums the step's figures over the
job, logs and records them; then validation and checkpoints when due. A stop (a signal, or the stop
file) ends the loop after the step in flight on every rank at once, with a checkpoint of that step."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import torch

from train_kernel.data.batches import MicroBatch, to_micro_batches
from train_kernel.flops import flops_per_step, tflops
from train_kernel.optim.zero import StepResult
from train_kernel.train.builder import BuiltRun
from train_kernel.train.run_output import RunOutput
from train_kernel.train.step import StepLoss
from train_kernel.train.stop_file import SAVE, STOP, StopFile
from train_kernel.train.stop_request import StopRequest
from train_kernel.train.tgs_stats import TgsStats
from train_kernel.train.token_metrics import TokenMetrics
from train_kernel.train.validation import validate

log = logging.getLogger(__name__)


class JobStep(NamedTuple):
    """A step's figures for the whole job (every rank gets the same)."""

    loss: float  # averaged over data parallel
    tokens: int  # summed over data parallel
    stop: bool  # some rank was asked to stop
    save: bool  # the stop file asked for a checkpoint of this step


class TrainLoop:
    def __init__(self, *, run: BuiltRun, output: RunOutput, stop: StopRequest) -> None:
        self.run, self.output, self.stop = run, output, stop
        self.config, self.parallel = run.config, run.parallel
        self.state = run.counters  # what checkpoints save and resume restores
        self.metrics = TokenMetrics(run.data.train_rows.type_names)
        self.tgs = TgsStats()  # the tgs/* windows of the log line
        self.stop_file = StopFile(self.config.ckpt.stop_file_path if self.parallel.rank == 0 else None)
        self.stopping = False  # some rank was asked to stop: every rank stops after this step
        self.save_requested = False  # the stop file asked for a checkpoint after this step
        self.step_seconds_ema: float | None = None
        self.losses: list[float] = []  # every step's loss, for the closing summary
        self.started = time.perf_counter()

    def run_to_end(self) -> None:
        total, valid_every = self.config.data.total_steps, self.config.data.valid_every
        if self.state.batch_count >= total:
            log.info("nothing to train: the checkpoint is at step %d of %d", self.state.batch_count, total)
        while self.state.batch_count < total and not self.stopping:
            self.train_step()
            done = self.state.batch_count
            if self.run.data.valid_sets and valid_every and done % valid_every == 0:
                self.validate(step=done - 1)
            self.save_if_due(done)
        self._summarise()

    def train_step(self) -> None:
        state, optim = self.state, self.run.optim
        started = time.perf_counter()
        micro_batches = self._next_micro_batches()
        data_ready = time.perf_counter()
        self.run.model.train()
        self.metrics.reset()
        step_loss = self.run.schedule.forward_backward(
            micro_batches, optim.optimizer.scaler.scale, self.metrics
        )
        fwd_bwd_seconds = time.perf_counter() - data_ready
        result = optim.optimizer.step(
            lr=optim.lr.lr_at(state.step_count), beta2=optim.beta2.beta2_at(state.step_count)
        )
        if result.updated:
            state.step_count += 1
        else:
            state.inf_nan_skip_batches += 1
            log.warning(
                "inf or nan in the gradients at step %d: update skipped, loss scale now %s",
                state.batch_count,
                optim.optimizer.scaler.scale,
            )
        order = self.stop_file.order_at(state.batch_count + 1)
        job = self._sum_over_job(
            step_loss.loss,
            sum(m.num_tokens for m in micro_batches),
            self.stop.requested or order == STOP,
            order == SAVE,
        )
        self.stopping, self.save_requested = job.stop, job.save
        if self.run.device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = time.perf_counter() - started
        state.num_consumed_tokens += job.tokens  # the global batch's
        record = self._record(step_loss, job, result, len(micro_batches), step_seconds, fwd_bwd_seconds)
        record["data_wait_s"] = round(data_ready - started, 6)
        self.output.train_step(record)
        self.losses.append(job.loss)
        state.batch_count += 1

    def _next_micro_batches(self) -> list[MicroBatch]:
        sampled = self.run.data.sampler.next_batch(self.state.step_count)
        while sampled.skipped:
            log.warning("skipping batch %d as data.skip_batches asks", sampled.index)
            sampled = self.run.data.sampler.next_batch(self.state.step_count)
        return to_micro_batches(self.run.data.train_rows.batch(sampled.rows), self.run.device)

    def _sum_over_job(self, loss: float, tokens: int, stop: bool, save: bool) -> JobStep:
        """With a pipeline only the last stage has a loss and metrics, and it alone counts the
        tokens; the other stages add zeros. The stop flags ride along, so a signal that reached one
        rank stops all of them at the same step."""
        if not self.parallel.is_last_stage:
            loss, tokens = 0.0, 0
        local = torch.tensor([loss, float(tokens), float(stop), float(save)], dtype=torch.float64)
        packed = self.parallel.sum_over_job(
            torch.cat([local, self.metrics.sums.reshape(-1)]), self.run.device
        )
        self.metrics.sums.copy_(packed[4:].view_as(self.metrics.sums))
        total_loss, total_tokens, stops, saves = packed[:4].tolist()
        return JobStep(total_loss / self.parallel.dp_size, int(total_tokens), stops > 0, saves > 0)

    def _record(
        self,
        step_loss: StepLoss,
        job: JobStep,
        result: StepResult,
        micro_num: int,
        step_seconds: float,
        fwd_bwd_seconds: float,
    ) -> dict[str, Any]:
        """The log line's fields: loss, tokens, tgs and tflops for the whole job; micro_num and the
        batch shape fields are this rank's."""
        state, world_size = self.state, self.parallel.world_size
        ema = self.step_seconds_ema
        self.step_seconds_ema = step_seconds if ema is None else 0.9 * ema + 0.1 * step_seconds
        segments = step_loss.segments_per_micro_batch
        record = {
            "tflops": tflops(
                flops_per_step(self.config, self.parallel.dp_size, micro_num), step_seconds, world_size
            ),
            "step": state.batch_count,
            "loss": job.loss,
            "tgs": round(job.tokens / world_size / step_seconds, 2),
            **self.tgs.update(job.tokens / world_size, step_seconds),
            "lr": self.run.optim.lr.lr_at(state.step_count),
            "loss_scale": float(
                self.run.optim.optimizer.scaler.scale
            ),  # after the scaler's update, as InternLM logs it
            "grad_norm": {"0_default": result.grad_norm},
            "micro_num": micro_num,
            "num_consumed_tokens": state.num_consumed_tokens,
            "inf_nan_skip_batches": state.inf_nan_skip_batches,
            "num_samples_in_batch": sum(segments),
            "largest_length": step_loss.largest_length,
            "largest_batch": max(segments),
            "smallest_batch": min(segments),
            "adam_beta2": self.run.optim.beta2.beta2_at(state.step_count),
            "fwd_bwd_time": round(fwd_bwd_seconds, 2),
        }
        record.update(self.metrics.summary())
        remaining = self.config.data.total_steps - state.batch_count - 1
        record["eta_s"] = round(remaining * self.step_seconds_ema, 1)
        return record

    def validate(self, *, step: int) -> None:
        for name, rows in self.run.data.valid_sets.items():  # every rank in the same order
            record = validate(
                name=name,
                model=self.run.model,
                schedule=self.run.schedule,
                rows=rows,
                batch_rows=self.config.data.valid_micro_num or self.config.data.micro_num,
                parallel=self.parallel,
                device=self.run.device,
                step=step,
            )
            self.output.validation(name, record)

    def save_if_due(self, step: int) -> None:
        """The checkpoint the schedule asks for, or one of this step when a stop or the stop file
        asks (a stop keeps the step it ends on)."""
        checkpoints = self.run.checkpoints
        asked = self.stopping or self.save_requested
        kind = "checkpoint" if asked else checkpoints.due(step)
        if not kind:
            return
        saved = checkpoints.save(self.run.checkpoint_state, step, kind)
        if saved is None and asked and not checkpoints.enabled and self.parallel.rank == 0:
            log.warning("step %d: checkpoint requested but enable_save_ckpt is off; nothing saved", step)

    def _summarise(self) -> None:
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
