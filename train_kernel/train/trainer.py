"""The training loop of one process: data, model, optimizer and schedules built from the config,
then step after step with InternLM's log line, metrics records, validation and model saves."""

from __future__ import annotations

import logging
import pathlib
import signal
import time
from dataclasses import dataclass

import torch

from metrics.emitter import MetricsEmitter
from train_kernel.backend_flags import apply_backend_flags
from train_kernel.checkpoint.capture import RunState
from train_kernel.checkpoint.manager import CheckpointManager
from train_kernel.config import ConfigError, TrainConfig
from train_kernel.data import row_sources
from train_kernel.data.batches import RowSource, to_micro_batches
from train_kernel.data.sampler import BatchSampler, Rampup
from train_kernel.device_speed import AUTO, CANONICAL, choose_dtype, default_device
from train_kernel.flops import flops_per_step, tflops
from train_kernel.model import build_model, count_parameters
from train_kernel.optim.hybrid_adamw import AdamSettings
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.schedules import Beta2Schedule, WarmupCosineLR
from train_kernel.optim.zero import ZeroOptimizer
from train_kernel.parallel.collectives import sum_over
from train_kernel.parallel.process_groups import ParallelContext, init_parallel
from train_kernel.parallel.stage import StageChunks, build_stage, build_stage_chunks
from train_kernel.plan import make_plan, memory_fit_warning
from train_kernel.train.host_memory import keep_freed_host_memory
from train_kernel.train.log_line import format_log_line
from train_kernel.train.run_folder import resolve_run_dir, setup_logging
from train_kernel.train.step_schedule import build_step_schedule
from train_kernel.train.stop_file import SAVE, STOP, StopFile
from train_kernel.train.tgs_stats import TgsStats
from train_kernel.train.token_metrics import TokenMetrics

log = logging.getLogger(__name__)


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the step in flight (Slurm sends SIGTERM before
    it kills a preempted job); a second signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
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


def resolve_dtype(config: TrainConfig, device: torch.device, parallel: ParallelContext) -> TrainConfig:
    """`config` with model.dtype concrete for `device`: "auto" takes rank 0's choice on every rank
    (ranks on machines of different classes must still agree); an explicit dtype stays. Logs the
    choice with its figures and warns when this device emulates the dtype."""
    choice = choose_dtype(config.model.dtype, device)
    if config.model.dtype == AUTO and parallel.distributed:
        names = list(CANONICAL.values())
        code = torch.tensor([names.index(choice.name)], device=device)
        torch.distributed.broadcast(code, src=0)
        rank0_name = names[int(code.item())]
        if rank0_name != choice.name:  # this rank's device differs from rank 0's: say what it costs here
            emulated = choose_dtype(rank0_name, device).warning
            log.warning(
                "rank %d: dtype auto -> %s (rank 0's choice; here: %s)%s",
                parallel.rank,
                rank0_name,
                choice.reason,
                f"; {emulated}" if emulated else "",
            )
            return config.with_model_dtype(rank0_name)
    if parallel.rank == 0:  # one line (and one warning) for the job
        log.info("%s", choice.log_line())
        if choice.warning:
            log.warning("%s", choice.warning)
    return config.with_model_dtype(choice.name)


class _NoEmitter:
    """What ranks other than 0 emit to: nothing (rank 0 alone writes metrics.jsonl)."""

    def emit(self, kind: str, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def build_row_sources(
    config: TrainConfig, dp_size: int = 1, run_dir: pathlib.Path | None = None
) -> tuple[RowSource, dict[str, RowSource]]:
    """Training rows and the named validation sets (train_kernel.data.row_sources)."""
    run_dir = run_dir if run_dir is not None else resolve_run_dir(config.run_dir, config.job_name)
    return row_sources.build_row_sources(config, dp_size, run_dir)


def train(config: TrainConfig) -> None:
    """Trains `config` as this process's rank (RANK / WORLD_SIZE from the launcher; one process
    without them). Process groups are torn down however the run ends."""
    parallel = init_parallel(config.parallel)
    finished = False
    try:
        _train(config, parallel)
        finished = True
    finally:
        parallel.close(barrier=finished)


def _broadcast_parameters(model: torch.nn.Module, parallel: ParallelContext) -> None:
    if parallel.data_group is None:
        return
    first = parallel.layout.data_group(parallel.rank)[0]
    with torch.no_grad():
        for p in model.parameters():
            # NOTE: every rank initialises from the same seed already; this one-time broadcast from
            # the first data-parallel rank makes identical replicas a guarantee, not an assumption
            # about the device's random number generators.
            torch.distributed.broadcast(p.data, src=first, group=parallel.data_group)


def _warn_if_plan_exceeds_device(
    config: TrainConfig, parallel: ParallelContext, device: torch.device
) -> None:
    """Before minutes of model building end in out-of-memory: the plan's per-rank estimate
    against the device's memory, with the settings that would shrink it."""
    try:
        plan = make_plan(config, parallel.layout.world_size)
    except (ConfigError, ValueError, RuntimeError) as error:  # a plan is advice: never stop a run
        log.debug("no memory plan: %s", error)
        return
    warning = memory_fit_warning(plan, torch.cuda.get_device_properties(device).total_memory)
    if warning:
        log.warning("%s", warning)


def _train(config: TrainConfig, parallel: ParallelContext) -> None:
    run_dir = resolve_run_dir(config.run_dir, config.job_name)
    setup_logging(run_dir, parallel.rank)
    apply_backend_flags(config)  # before resolve_dtype: "torch.tf32" resolves to float32
    device = default_device()
    config = resolve_dtype(config, device, parallel)
    if device.type == "cpu":
        keep_freed_host_memory()
    elif parallel.rank == 0:  # the plan's figure is the largest rank's: one warning for the job
        _warn_if_plan_exceeds_device(config, parallel, device)
    torch.manual_seed(config.seed)
    train_rows, valid_rows = build_row_sources(config, parallel.dp_size, run_dir)
    if parallel.pp_size > 1 and config.model.num_chunks > 1:
        model = build_stage_chunks(config.model, parallel.pp_rank, parallel.pp_size, device, seed=config.seed)
        layers = [list(chunk.layers.keys()) for chunk in model.chunks]
        log.info(
            "pipeline stage %d of %d, interleaved: layers %s", parallel.pp_rank, parallel.pp_size, layers
        )
    elif parallel.pp_size > 1:
        model = build_stage(config.model, parallel.pp_rank, parallel.pp_size, device, seed=config.seed)
        layers = list(model.layers.keys())
        log.info(
            "pipeline stage %d of %d: layers %s to %s",
            parallel.pp_rank,
            parallel.pp_size,
            layers[0],
            layers[-1],
        )
    else:
        model = build_model(config.model, device, seed=config.seed)
    _broadcast_parameters(model, parallel)
    log.info("parallel: %s", parallel.layout.describe())
    log.info(
        "model: %s parameters, dtype %s, on %s; data: %s rows of %s tokens",
        f"{count_parameters(model):,}",
        config.model.dtype,
        device,
        f"{len(train_rows):,}",
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
    optimizer = ZeroOptimizer(
        list(model.parameters()),
        AdamSettings(adam.lr, adam.adam_beta1, adam.adam_beta2, adam.adam_eps, adam.weight_decay),
        scaler,
        config.hybrid_zero_optimizer.clip_grad_norm,
        data_group=parallel.data_group,
        data_size=parallel.dp_size,
        zero_group=parallel.zero_group,
        zero_ranks=parallel.zero_ranks,
        zero_rank=parallel.zero_rank,
        pipeline_group=parallel.pipeline_group,
        overlap_grad_reduce=config.hybrid_zero_optimizer.overlap_sync_grad,
        reduce_bucket_size=config.hybrid_zero_optimizer.reduce_bucket_size,
    )
    if config.hybrid_zero_optimizer.overlap_sync_param and optimizer.zero_group is not None:
        optimizer.overlap_param_sync(list(model.chunks) if isinstance(model, StageChunks) else [model])
        log.info("ZeRO-1 parameter broadcast overlapped with the next forward (overlap_sync_param)")
    if optimizer.grad_reducer is not None:
        log.info(
            "data-parallel gradient all-reduce overlapped with backward: %d buckets of <= %s elements",
            len(optimizer.grad_reducer.buckets),
            f"{config.hybrid_zero_optimizer.reduce_bucket_size:,}",
        )
    # The seed's start-up line: how evenly ZeRO-1 split this stage's parameters over its group.
    log.info(
        "Number of elements on ranks: %s, rank:%d",
        [end - start for start, end in optimizer.ranges],
        parallel.rank,
    )
    lr_cfg = config.lr_scheduler
    lr_schedule = WarmupCosineLR(
        adam.lr, lr_cfg.total_steps, lr_cfg.warmup_ratio, lr_cfg.eta_min, lr_cfg.init_steps
    )
    beta2_schedule = Beta2Schedule(config.beta2_scheduler.init_beta2, config.beta2_scheduler.c)
    data = config.data
    rampup = data.rampup
    sampler = BatchSampler(
        len(train_rows),
        data.micro_num,
        config.seed,
        dp_rank=parallel.dp_rank,
        dp_size=parallel.dp_size,
        rampup=Rampup(rampup.start_bsz, rampup.bsz_incre, rampup.incre_every) if rampup else None,
        skip_batches=tuple(data.skip_batch_indices),
    )
    checkpoints = CheckpointManager(config, parallel)
    try:
        checkpoints.check_storage()
        counters = TrainState()
        run = RunState(config, model, optimizer, sampler, counters, parallel)
        checkpoints.resume(run)
        emitter = MetricsEmitter(run_dir) if parallel.is_logging_rank else _NoEmitter()
        if parallel.is_logging_rank:
            (run_dir / "config.py").write_text(config.source_text, encoding="utf-8")
        tags = {
            "job_name": config.job_name,
            "world_size": parallel.world_size,
            "parallel": parallel.layout.describe(),
        }
        emitter.emit("params", {"params": config.to_json(), "tags": tags, "step": counters.batch_count})
        sidecar = _start_metrics_sidecar(config, run_dir) if parallel.is_logging_rank else None
        loop = _Loop(
            config,
            model,
            optimizer,
            lr_schedule,
            beta2_schedule,
            sampler,
            train_rows,
            valid_rows,
            emitter,
            device,
            run_dir,
            parallel,
            run,
            checkpoints,
            sidecar,
        )
        try:
            with StopRequest() as stop:
                loop.run(stop)
        finally:
            emitter.close()
            if sidecar is not None:
                log.info("metrics: waiting for the sidecar to forward the last records to MLflow")
                sidecar.restart_if_exited(min_interval_s=0)  # one that died still gets to drain
                code = sidecar.stop(timeout_s=120)
                if code != 0:
                    log.warning(
                        "metrics sidecar exited with %s; see %s (rerun `metrics-sidecar run --once` "
                        "on this run folder to forward what is left)",
                        code,
                        sidecar.log_file,
                    )
    finally:
        checkpoints.close()
    if stop.signal is not None:
        raise SystemExit(128 + stop.signal)


def _start_metrics_sidecar(config: TrainConfig, run_dir):
    """The metrics sidecar beside rank 0 when the config names an MLflow tracking URI; it tails
    metrics.jsonl, so training never waits on MLflow."""
    uri = config.metrics.mlflow_tracking_uri
    if not uri:
        return None
    from metrics.redact import redact_uri
    from metrics.supervisor import start_sidecar

    shown = redact_uri(uri)  # a password or token in the URI never reaches the log
    try:
        sidecar = start_sidecar(run_dir, uri, config.metrics.experiment)
    except (ModuleNotFoundError, OSError) as error:
        # Monitoring must not stop a training run: every record is still in metrics.jsonl.
        log.warning(
            "metrics: no MLflow sidecar (%s); the records stay in %s, forward them later with "
            "`MLFLOW_TRACKING_URI=%s metrics-sidecar run --run-dir %s --once`",
            error,
            run_dir / "metrics.jsonl",
            shown,
            run_dir,
        )
        return None
    log.info(
        "metrics: sidecar pid %d forwards %s to MLflow at %s", sidecar.pid, run_dir / "metrics.jsonl", shown
    )
    return sidecar


class _Loop:
    def __init__(
        self,
        config,
        model,
        optimizer,
        lr_schedule,
        beta2_schedule,
        sampler,
        train_rows,
        valid_rows,
        emitter,
        device,
        run_dir,
        parallel: ParallelContext,
        run_state: RunState,
        checkpoints: CheckpointManager,
        sidecar=None,
    ) -> None:
        self.parallel = parallel
        self.stopping = False  # some rank was asked to stop: every rank stops after this step
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
        self.state = run_state.counters  # what checkpoints save and resume restores
        self.metrics = TokenMetrics(train_rows.type_names)
        self.tgs = TgsStats()  # the tgs/* windows of the log line
        self.step_seconds_ema: float | None = None
        self.data_wait_seconds = 0.0
        self.losses: list[float] = []  # every step's loss, for the closing summary
        self.started = time.perf_counter()
        self.checkpoints = checkpoints
        self.sidecar = sidecar  # rank 0's metrics sidecar, kept running
        self.run_state = run_state
        self.stop_file = StopFile(config.ckpt.stop_file_path if parallel.rank == 0 else None)
        self.save_requested = False  # the stop file asked for a checkpoint after this step
        self.schedule = build_step_schedule(
            config=config, model=model, optimizer=optimizer, parallel=parallel, device=device
        )

    def run(self, stop: StopRequest) -> None:
        total = self.config.data.total_steps
        if self.state.batch_count >= total:
            log.info("nothing to train: the checkpoint is at step %d of %d", self.state.batch_count, total)
        while self.state.batch_count < total and not self.stopping:
            self.train_step(stop)
            done = self.state.batch_count
            if self.valid_rows and self.config.data.valid_every and done % self.config.data.valid_every == 0:
                self.validate()
            kind = self.checkpoints.due(done)
            if self.stopping or self.save_requested:
                kind = "checkpoint"  # a stop (signal or stop file) or the stop file's save: keep this step
            if kind:
                saved = self.checkpoints.save(self.run_state, done, kind)
                if (
                    saved is None
                    and not self.checkpoints.enabled
                    and (self.stopping or self.save_requested)
                    and self.parallel.rank == 0
                ):
                    log.warning(
                        "step %d: checkpoint requested but enable_save_ckpt is off; nothing saved", done
                    )
        self._summarise()

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

    def _reduce_step_stats(
        self, loss: float, tokens: int, stop_requested: bool, save_requested: bool = False
    ) -> tuple[float, int, bool]:
        """The step's loss averaged, tokens and metric sums summed over data parallel, and whether
        any rank was asked to stop. With a pipeline only the last stage has a loss and metrics, and
        it alone counts the tokens; the other stages add zeros."""
        if not self.parallel.is_last_stage:
            loss, tokens = 0.0, 0
        local = torch.tensor(
            [loss, float(tokens), float(stop_requested), float(save_requested)], dtype=torch.float64
        )
        packed = torch.cat([local, self.metrics.sums.reshape(-1)])
        # NOTE: brings the last stage's loss, tokens and metric sums to every stage (the logging
        # rank is on stage 0), and every stage's stop flag to all; no-op without a pipeline.
        packed = sum_over(packed.to(self.device), self.parallel.pipeline_group)
        # NOTE: one all-reduce per step carries every number the log line reports for the whole job
        # (and the stop flag, so a signal that reached one rank stops all of them at the same step).
        packed = sum_over(packed.to(self.device), self.parallel.data_group).cpu()
        self.metrics.sums.copy_(packed[4:].view_as(self.metrics.sums))
        total_loss, total_tokens, stops, saves = packed[:4].tolist()
        self.save_requested = saves > 0
        return total_loss / self.parallel.dp_size, int(total_tokens), stops > 0

    def train_step(self, stop: StopRequest) -> None:
        state = self.state
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
        step_loss = self.schedule.forward_backward(micro_batches, self.optimizer.scaler.scale, self.metrics)
        fwd_bwd_seconds = time.perf_counter() - data_ready
        result = self.optimizer.step(
            lr=self.lr_schedule.lr_at(state.step_count), beta2=self.beta2_schedule.beta2_at(state.step_count)
        )
        if result.updated:
            state.step_count += 1
        else:
            state.inf_nan_skip_batches += 1
            log.warning(
                "inf or nan in the gradients at step %d: update skipped, loss scale now %s",
                state.batch_count,
                self.optimizer.scaler.scale,
            )
        order = self.stop_file.order_at(state.batch_count + 1)
        loss, tokens, self.stopping = self._reduce_step_stats(
            step_loss.loss,
            sum(m.num_tokens for m in micro_batches),
            stop.signal is not None or order == STOP,
            order == SAVE,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds = time.perf_counter() - started
        state.num_consumed_tokens += tokens  # the global batch's
        record = self._record(
            step_loss, loss, result, len(micro_batches), tokens, step_seconds, fwd_bwd_seconds
        )
        record["data_wait_s"] = round(data_ready - started, 6)
        log.info(format_log_line(record))
        self.emitter.emit("train", record)
        if self.sidecar is not None and self.sidecar.restart_if_exited():
            log.warning("metrics: the sidecar had exited (see %s); started it again", self.sidecar.log_file)
        self.losses.append(loss)
        state.batch_count += 1

    def _record(self, step_loss, loss, result, micro_num, tokens, step_seconds, fwd_bwd_seconds) -> dict:
        """The log line's fields: loss, tokens, tgs and tflops for the whole job (`loss` averaged and
        `tokens` summed over data parallel); micro_num and the batch shape fields are this rank's."""
        state = self.state
        world_size = self.parallel.world_size
        self.step_seconds_ema = (
            step_seconds
            if self.step_seconds_ema is None
            else 0.9 * self.step_seconds_ema + 0.1 * step_seconds
        )
        segments = step_loss.segments_per_micro_batch
        record = {
            "tflops": tflops(
                flops_per_step(self.config, self.parallel.dp_size, micro_num), step_seconds, world_size
            ),
            "step": state.batch_count,
            "loss": loss,
            "tgs": round(tokens / world_size / step_seconds, 2),
            **self.tgs.update(tokens / world_size, step_seconds),
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
        for name, rows in self.valid_rows.items():  # every rank in the same order
            self._validate_set(name, rows)

    def _validate_set(self, name: str, rows: RowSource) -> None:
        batch_rows = self.config.data.valid_micro_num or self.config.data.micro_num
        metrics = TokenMetrics(rows.type_names)
        losses = []
        self.model.eval()
        started = time.perf_counter()
        # Data-parallel rank r validates the batches r, r + dp, r + 2 dp, ... of the split.
        dp_rank, dp_size = self.parallel.dp_rank, self.parallel.dp_size
        for start in range(dp_rank * batch_rows, len(rows), batch_rows * dp_size):
            batch = rows.batch(range(start, min(start + batch_rows, len(rows))))
            for micro in to_micro_batches(batch, self.device):
                loss = self.schedule.forward_only(micro, metrics)
                if loss is not None:  # the last stage's
                    losses.append(loss)
        self.model.train()
        packed = torch.cat(
            [torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64), metrics.sums.reshape(-1)]
        )
        # NOTE: only the last pipeline stage has losses and metrics; the sum brings them to every
        # stage (no-op without a pipeline).
        packed = sum_over(packed.to(self.device), self.parallel.pipeline_group)
        # NOTE: each rank saw a disjoint share of the validation split; the sums make the record the
        # whole split's, as one process would have computed it.
        packed = sum_over(packed.to(self.device), self.parallel.data_group).cpu()
        metrics.sums.copy_(packed[2:].view_as(metrics.sums))
        loss_sum, count = packed[:2].tolist()
        seconds = round(time.perf_counter() - started, 2)
        step, loss = self.state.batch_count - 1, loss_sum / max(count, 1)
        record = row_sources.validation_record(name, step, loss, metrics.summary(), seconds)
        log.info((f"Validation on {name}: " if name else "validation: ") + format_log_line(record))
        self.emitter.emit("valid", record)
