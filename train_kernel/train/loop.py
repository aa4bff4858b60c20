"""The training loop of one rank, over the parts train/builder.py made: each step takes its batch,
runs the step schedule's forwards and backwards and the optimizer, sums the step's figures over the
job, logs and records them; then validation and checkpoints when due. A stop (a signal, or the stop
file) ends the loop after the step in flight on every rank at once, with a checkpoint of that step."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from train_kernel.data.batches import MicroBatch, to_micro_batches
from train_kernel.health.run_health import RunHealth
from train_kernel.train.builder import BuiltRun
from train_kernel.train.run_output import RunOutput
from train_kernel.train.step_record import StepFigures, StepRecords
from train_kernel.train.stop_file import SAVE, STOP, StopFile
from train_kernel.train.stop_request import StopRequest
from train_kernel.train.token_metrics import TokenMetrics
from train_kernel.train.validation import validate

log = logging.getLogger(__name__)


class JobSums(NamedTuple):
    """A step's figures summed over the job: every rank gets the same."""

    loss: float  # averaged over data parallel
    tokens: int  # summed over data parallel
    stop: bool  # some rank was asked to stop
    save: bool  # the stop file asked for a checkpoint of this step


class TrainLoop:
    def __init__(self, *, run: BuiltRun, output: RunOutput, stop: StopRequest, health: RunHealth) -> None:
        self.run, self.output, self.stop, self.health = run, output, stop, health
        self.config, self.parallel, self.state = run.config, run.parallel, run.counters
        self.metrics = TokenMetrics(run.data.train_rows.type_names)
        self.records = StepRecords(
            config=run.config, parallel=run.parallel, optim=run.optim, counters=run.counters
        )
        self.stop_file = StopFile(self.config.ckpt.stop_file_path if self.parallel.rank == 0 else None)
        self.stopping = False  # some rank was asked to stop: every rank stops after this step
        self.save_requested = False  # the stop file asked for a checkpoint after this step

    def run_to_end(self) -> None:
        total, valid_every = self.config.data.total_steps, self.config.data.valid_every
        if self.state.batch_count >= total:
            log.info("nothing to train: the checkpoint is at step %d of %d", self.state.batch_count, total)
        while self.state.batch_count < total and not self.stopping:
            if self.train_step():
                continue  # rolled back to a checkpoint (train_kernel.health): nothing is due
            done = self.state.batch_count
            if self.run.data.valid_sets and valid_every and done % valid_every == 0:
                self.validate(step=done - 1)
            self.save_if_due(done)
        self.records.summarise()

    def train_step(self) -> bool:
        """One step; True when the health checks rolled the run back to a checkpoint after it."""
        state, optimizer, optim = self.state, self.run.optim.optimizer, self.run.optim
        self.health.before_step(state.batch_count)
        started = time.perf_counter()
        micro_batches = self._next_micro_batches()
        data_ready = time.perf_counter()
        self.run.model.train()
        self.metrics.reset()
        scale = self.health.loss_scale(state.batch_count, optimizer.scaler.scale)
        step_loss = self.run.schedule.forward_backward(micro_batches, scale, self.metrics)
        fwd_bwd_seconds = time.perf_counter() - data_ready
        result = optimizer.step(
            lr=optim.lr.lr_at(state.step_count), beta2=optim.beta2.beta2_at(state.step_count)
        )
        if result.updated:
            state.step_count += 1
        else:
            state.inf_nan_skip_batches += 1
            log.warning(
                "inf or nan in the gradients at step %d: update skipped, loss scale now %s",
                state.batch_count,
                optimizer.scaler.scale,
            )
        order = self.stop_file.order_at(state.batch_count + 1)
        tokens = sum(m.num_tokens for m in micro_batches)
        job = self._sum_over_job(step_loss.loss, tokens, self.stop.requested or order == STOP, order == SAVE)
        self.stopping, self.save_requested = job.stop, job.save
        if self.run.device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = time.perf_counter() - started
        state.num_consumed_tokens += job.tokens  # the global batch's
        figures = StepFigures(
            step_loss=step_loss,
            loss=job.loss,
            tokens=job.tokens,
            result=result,
            micro_num=len(micro_batches),
            seconds=step_seconds,
            fwd_bwd_seconds=fwd_bwd_seconds,
            data_wait_seconds=data_ready - started,
        )
        record = self.records.record(figures, self.metrics)
        self.output.train_step(record)
        state.batch_count += 1
        return self.health.after_step(record, result.updated, step_seconds)

    def _next_micro_batches(self) -> list[MicroBatch]:
        sampled = self.run.data.sampler.next_batch(self.state.step_count)
        while sampled.skipped:
            log.warning("skipping batch %d (data.skip_batches, or a rollback's data window)", sampled.index)
            sampled = self.run.data.sampler.next_batch(self.state.step_count)
        return to_micro_batches(self.run.data.train_rows.batch(sampled.rows), self.run.device)

    def _sum_over_job(self, loss: float, tokens: int, stop: bool, save: bool) -> JobSums:
        """With a pipeline only the last stage has a loss and metrics, and it alone counts the
        tokens; the other stages add zeros. The stop flags ride along in the same all-reduce, so a
        signal that reached one rank stops all of them at the same step."""
        if not self.parallel.is_last_stage:
            loss, tokens = 0.0, 0
        local = torch.tensor([loss, float(tokens), float(stop), float(save)], dtype=torch.float64)
        packed = self.parallel.sum_over_job(
            torch.cat([local, self.metrics.sums.reshape(-1)]), self.run.device
        )
        self.metrics.sums.copy_(packed[4:].view_as(self.metrics.sums))
        total_loss, total_tokens, stops, saves = packed[:4].tolist()
        return JobSums(total_loss / self.parallel.dp_size, int(total_tokens), stops > 0, saves > 0)

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
