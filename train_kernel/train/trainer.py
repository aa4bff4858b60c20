"""The training loop of one process: data, model, optimizer and schedules built from the config,
then step after step with InternLM's log line, metrics records, validation and model saves."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from metrics.emitter import MetricsEmitter
from train_kernel.config import TrainConfig
from train_kernel.data.batches import PackedRows, RandomRows, RowSource, to_micro_batches
from train_kernel.data.sampler import BatchSampler, Rampup
from train_kernel.flops import flops_per_step, tflops
from train_kernel.model import build_model, count_parameters, save_model_checkpoint
from train_kernel.optim.hybrid_adamw import AdamSettings, HybridAdamW
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.schedules import Beta2Schedule, WarmupCosineLR
from train_kernel.train.log_line import format_log_line
from train_kernel.train.run_folder import resolve_run_dir, setup_logging, storage_path
from train_kernel.train.step import forward_backward, forward_only
from train_kernel.train.token_metrics import TokenMetrics

log = logging.getLogger(__name__)


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the step in flight (Slurm sends SIGTERM before
    it kills a preempted job); a second signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)


@dataclass
class TrainState:
    batch_count: int = 0  # batches trained on or skipped for overflow: the log's `step`
    step_count: int = 0  # successful optimizer updates: drives the lr and beta2 schedules
    inf_nan_skip_batches: int = 0
    num_consumed_tokens: int = 0


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_row_sources(config: TrainConfig) -> tuple[RowSource, RowSource | None]:
    data, model = config.data, config.model
    if data.train_folder is None:
        rows = data.total_steps * data.micro_num
        return RandomRows(rows, data.seq_len, data.micro_bsz, model.vocab_size, config.seed), None
    train = PackedRows(data.train_folder, "train", data.seq_len, data.micro_bsz, model.vocab_size)
    valid_folder = data.valid_folder or data.train_folder
    valid = None
    if data.valid_every > 0:
        try:
            valid = PackedRows(valid_folder, "valid", data.seq_len, data.micro_bsz, model.vocab_size)
        except (KeyError, ValueError) as error:
            log.warning("no validation: %s has no usable valid split (%s)", valid_folder, error)
    return train, valid


def train(config: TrainConfig) -> None:
    run_dir = resolve_run_dir(config.run_dir, config.job_name)
    setup_logging(run_dir)
    device = pick_device()
    torch.manual_seed(config.seed)
    train_rows, valid_rows = build_row_sources(config)
    model = build_model(config.model, device, seed=config.seed)
    log.info(
        "model: %s parameters, dtype %s, on %s; data: %s rows of %s tokens",
        f"{count_parameters(model):,}", config.model.dtype, device, f"{len(train_rows):,}",
        config.data.micro_bsz * config.data.seq_len,
    )
    scaler_cfg = config.grad_scaler
    scaler = DynamicLossScaler(
        initial_scale=scaler_cfg.fp16.initial_scale,
        growth_factor=scaler_cfg.growth_factor,
        backoff_factor=scaler_cfg.backoff_factor,
        growth_interval=scaler_cfg.fp16.growth_interval,
        min_scale=scaler_cfg.fp16.min_scale,
        max_scale=scaler_cfg.max_scale,
        hysteresis=scaler_cfg.hysteresis,
        enabled=config.model.torch_dtype == torch.float16,
    )
    adam = config.adam
    optimizer = HybridAdamW(
        list(model.parameters()),
        AdamSettings(adam.lr, adam.adam_beta1, adam.adam_beta2, adam.adam_eps, adam.weight_decay),
        scaler,
        clip_grad_norm=config.hybrid_zero_optimizer.clip_grad_norm,
    )
    lr_cfg = config.lr_scheduler
    lr_schedule = WarmupCosineLR(adam.lr, lr_cfg.total_steps, lr_cfg.warmup_ratio, lr_cfg.eta_min, lr_cfg.init_steps)
    beta2_schedule = Beta2Schedule(config.beta2_scheduler.init_beta2, config.beta2_scheduler.c)
    data = config.data
    rampup = data.rampup
    sampler = BatchSampler(
        len(train_rows),
        data.micro_num,
        config.seed,
        rampup=Rampup(rampup.start_bsz, rampup.bsz_incre, rampup.incre_every) if rampup else None,
        skip_batches=tuple(data.skip_batch_indices),
    )
    emitter = MetricsEmitter(run_dir)
    emitter.emit("params", {"params": config.to_json(), "tags": {"job_name": config.job_name, "world_size": 1}})
    loop = _Loop(config, model, optimizer, lr_schedule, beta2_schedule, sampler, train_rows, valid_rows, emitter, device, run_dir)
    try:
        with StopRequest() as stop:
            loop.run(stop)
    finally:
        emitter.close()
    if stop.signal is not None:
        raise SystemExit(128 + stop.signal)


class _Loop:
    def __init__(self, config, model, optimizer, lr_schedule, beta2_schedule, sampler, train_rows, valid_rows, emitter, device, run_dir) -> None:
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.beta2_schedule = beta2_schedule
        self.sampler = sampler
        self.train_rows = train_rows
        self.valid_rows = valid_rows
        self.emitter = emitter
        self.device = device
        self.run_dir = run_dir
        self.state = TrainState()
        self.metrics = TokenMetrics(train_rows.type_names)
        self.step_seconds_ema: float | None = None
        self.data_wait_seconds = 0.0

    def run(self, stop: StopRequest) -> None:
        total = self.config.data.total_steps
        ckpt = self.config.ckpt
        every = ckpt.checkpoint_every or total
        while self.state.batch_count < total and stop.signal is None:
            self.train_step()
            done = self.state.batch_count
            if self.valid_rows is not None and self.config.data.valid_every and done % self.config.data.valid_every == 0:
                self.validate()
            if ckpt.enable_save_ckpt and (done % every == 0 or done == total):
                self.save_model()
        if stop.signal is not None and ckpt.enable_save_ckpt and self.state.batch_count % every:
            log.warning("stopped at step %d; this run's last model save is the previous one", self.state.batch_count)

    def train_step(self) -> None:
        config, state = self.config, self.state
        started = time.perf_counter()
        sampled = self.sampler.next_batch(state.step_count)
        while sampled.skipped:
            log.warning("skipping batch %d as data.skip_batches asks", sampled.index)
            sampled = self.sampler.next_batch(state.step_count)
        micro_batches = to_micro_batches(self.train_rows.batch(sampled.rows), self.device)
        data_ready = time.perf_counter()
        self.data_wait_seconds += data_ready - started
        self.model.train()
        self.metrics.reset()
        step_loss = forward_backward(
            self.model, micro_batches, self.optimizer.scaler.scale, config.loss.label_smoothing, self.metrics
        )
        fwd_bwd_seconds = time.perf_counter() - data_ready
        result = self.optimizer.step(
            lr=self.lr_schedule.lr_at(state.step_count), beta2=self.beta2_schedule.beta2_at(state.step_count)
        )
        if result.updated:
            state.step_count += 1
        else:
            state.inf_nan_skip_batches += 1
            log.warning("inf or nan in the gradients at step %d: update skipped, loss scale now %s", state.batch_count, self.optimizer.scaler.scale)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = time.perf_counter() - started
        tokens = sum(m.num_tokens for m in micro_batches)
        state.num_consumed_tokens += tokens
        record = self._record(step_loss, result, len(micro_batches), tokens, step_seconds, fwd_bwd_seconds)
        record["data_wait_s"] = round(data_ready - started, 6)
        log.info(format_log_line(record))
        self.emitter.emit("train", record)
        state.batch_count += 1

    def _record(self, step_loss, result, micro_num, tokens, step_seconds, fwd_bwd_seconds) -> dict:
        state = self.state
        world_size = 1
        self.step_seconds_ema = step_seconds if self.step_seconds_ema is None else 0.9 * self.step_seconds_ema + 0.1 * step_seconds
        segments = step_loss.segments_per_micro_batch
        record = {
            "tflops": tflops(flops_per_step(self.config, 1, micro_num), step_seconds, world_size),
            "step": state.batch_count,
            "loss": step_loss.loss,
            "tgs": round(tokens / world_size / step_seconds, 2),
            "lr": self.lr_schedule.lr_at(state.step_count),
            # After the scaler's update, as InternLM logs it.
            "loss_scale": float(self.optimizer.scaler.scale),
            "grad_norm": {"0_default": result.grad_norm},
            "micro_num": micro_num,
            "num_consumed_tokens": state.num_consumed_tokens,
            "inf_nan_skip_batches": state.inf_nan_skip_batches,
            "num_samples_in_batch": sum(segments),
            "largest_length": step_loss.largest_length,
            "largest_batch": max(segments),
            "smallest_batch": min(segments),
            "adam_beta2": self.beta2_schedule.beta2_at(state.step_count),
            "fwd_bwd_time": round(fwd_bwd_seconds, 2),
        }
        record.update(self.metrics.summary())
        remaining = self.config.data.total_steps - state.batch_count - 1
        record["eta_s"] = round(remaining * self.step_seconds_ema, 1)
        return record

    def validate(self) -> None:
        rows = self.valid_rows
        batch_rows = self.config.data.valid_micro_num or self.config.data.micro_num
        metrics = TokenMetrics(rows.type_names)
        losses = []
        self.model.eval()
        started = time.perf_counter()
        for start in range(0, len(rows), batch_rows):
            batch = rows.batch(range(start, min(start + batch_rows, len(rows))))
            for micro in to_micro_batches(batch, self.device):
                losses.append(forward_only(self.model, micro, self.config.loss.label_smoothing, metrics))
        self.model.train()
        record = {"step": self.state.batch_count - 1, "val/loss": sum(losses) / max(len(losses), 1)}
        record.update({f"val/{k}": v for k, v in metrics.summary().items()})
        record["val/seconds"] = round(time.perf_counter() - started, 2)
        log.info("validation: " + format_log_line(record))
        self.emitter.emit("valid", record)

    def save_model(self) -> None:
        folder = storage_path(self.config.ckpt.save_ckpt_folder) / str(self.state.batch_count)
        started = time.perf_counter()
        save_model_checkpoint(self.model, folder)
        (folder / "config.py").write_text(self.config.source_text)
        log.info("saved model weights to %s in %.1f s", folder, time.perf_counter() - started)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("nan")
