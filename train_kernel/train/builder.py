"""Turns a checked config into the parts of this rank's run: the device and dtype, the data, the
model (the whole model or this rank's pipeline stage), the optimizer with its schedules, the step
schedule and the checkpoint manager. Nothing here trains; train/loop.py runs the parts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from train_kernel.checkpoint.capture import RunState
from train_kernel.checkpoint.manager import CheckpointManager
from train_kernel.config import ConfigError, TrainConfig
from train_kernel.data.batches import RowSource
from train_kernel.data.row_sources import build_row_sources
from train_kernel.data.sampler import BatchSampler
from train_kernel.device_speed import AUTO, CANONICAL, choose_dtype, default_device
from train_kernel.model import build_model, count_parameters
from train_kernel.optim.hybrid_adamw import AdamSettings
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.schedules import Beta2Schedule, WarmupCosineLR
from train_kernel.optim.zero import ZeroOptimizer
from train_kernel.parallel.dropout_rng import seed_rank_generators
from train_kernel.parallel.process_groups import ParallelContext
from train_kernel.parallel.stage import StageChunks, build_stage, build_stage_chunks
from train_kernel.parallel.tensor_parallel import shard_model_part, tensor_cutter, use_global_grad_norm
from train_kernel.plan import make_plan, memory_fit_warning
from train_kernel.train.host_memory import keep_freed_host_memory
from train_kernel.train.step_schedule import StepSchedule, build_step_schedule
from train_kernel.train.train_state import TrainState

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Data:
    train_rows: RowSource
    valid_sets: dict[str, RowSource]  # named validation sets, in order; empty: no validation
    sampler: BatchSampler  # which rows of train_rows each step takes on this rank


@dataclass(frozen=True, kw_only=True)
class Optimization:
    optimizer: ZeroOptimizer  # with its loss scaler
    lr: WarmupCosineLR
    beta2: Beta2Schedule


@dataclass(frozen=True, kw_only=True)
class BuiltRun:
    config: TrainConfig  # model.dtype concrete for this device
    parallel: ParallelContext
    device: torch.device
    run_dir: Path
    model: nn.Module  # the whole model, or this rank's pipeline stage (StageChunks when interleaved)
    optim: Optimization
    data: Data
    schedule: StepSchedule
    checkpoints: CheckpointManager
    counters: TrainState

    @cached_property
    def checkpoint_state(self) -> RunState:
        """What a checkpoint saves and a resume restores in place: these parts, by reference."""
        return RunState(
            config=self.config,
            model=self.model,
            optimizer=self.optim.optimizer,
            sampler=self.data.sampler,
            counters=self.counters,
            parallel=self.parallel,
        )


def build_run(config: TrainConfig, *, parallel: ParallelContext, run_dir: Path) -> BuiltRun:
    """Every part of this rank's run, in the order that keeps ranks and seeds in step: the dtype
    agreed by all ranks, the seed set before the model is initialised, the checkpoint manager
    last (it may start an uploader, which the caller closes)."""
    device = default_device()
    config = resolve_dtype(config, device, parallel)
    if device.type == "cpu":
        keep_freed_host_memory()
    elif parallel.rank == 0:  # the plan's figure is the largest rank's: one warning for the job
        _warn_if_plan_exceeds_device(config, parallel, device)
    seed_rank_generators(config.seed, parallel)  # dropout: a stream per data rank and stage
    train_rows, valid_sets = build_row_sources(config, parallel.dp_size, run_dir)
    model = build_model_part(config, parallel, device)
    log.info("parallel: %s", parallel.layout.describe())
    log.info(
        "model: %s parameters, dtype %s, on %s; data: %s rows of %s tokens",
        f"{count_parameters(model):,}",
        config.model.dtype,
        device,
        f"{len(train_rows):,}",
        config.data.micro_bsz * config.data.seq_len,
    )
    optim = build_optimization(config, model, parallel)
    sampler = BatchSampler(
        num_rows=len(train_rows),
        micro_num=config.data.micro_num,
        seed=config.seed,
        dp_rank=parallel.dp_rank,
        dp_size=parallel.dp_size,
        rampup=config.data.rampup,
        skip_batches=config.data.skip_batch_indices,
    )
    schedule = build_step_schedule(
        config=config, model=model, optimizer=optim.optimizer, parallel=parallel, device=device
    )
    return BuiltRun(
        config=config,
        parallel=parallel,
        device=device,
        run_dir=run_dir,
        model=model,
        optim=optim,
        data=Data(train_rows=train_rows, valid_sets=valid_sets, sampler=sampler),
        schedule=schedule,
        checkpoints=CheckpointManager(config, parallel),
        counters=TrainState(),
    )


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


def build_model_part(config: TrainConfig, parallel: ParallelContext, device: torch.device) -> nn.Module:
    """The model this rank holds (initialised from config.seed), the same on every data-parallel
    replica."""
    shard = tensor_cutter(config.model, parallel)  # tensor parallelism: cut before materialising
    if parallel.pp_size > 1 and config.model.num_chunks > 1:
        model: nn.Module = build_stage_chunks(
            config.model, parallel.pp_rank, parallel.pp_size, device, seed=config.seed, shard=shard
        )
        layers = [list(chunk.layers.keys()) for chunk in model.chunks]
        log.info(
            "pipeline stage %d of %d, interleaved: layers %s", parallel.pp_rank, parallel.pp_size, layers
        )
    elif parallel.pp_size > 1:
        model = build_stage(
            config.model, parallel.pp_rank, parallel.pp_size, device, seed=config.seed, shard=shard
        )
        names = list(model.layers.keys())
        log.info(
            "pipeline stage %d of %d: layers %s to %s",
            parallel.pp_rank,
            parallel.pp_size,
            names[0],
            names[-1],
        )
    else:
        model = build_model(config.model, device, seed=config.seed, shard=shard)
    model = shard_model_part(model, config.model, parallel)  # tensor parallelism (no-op without)
    if parallel.data_group is not None:
        first = parallel.layout.data_group(parallel.rank)[0]
        with torch.no_grad():
            for p in model.parameters():
                # NOTE: every rank initialises from the same seed already; this one-time broadcast
                # from the first data-parallel rank makes identical replicas a guarantee, not an
                # assumption about the device's random number generators.
                torch.distributed.broadcast(p.data, src=first, group=parallel.data_group)
    return model


def build_optimization(config: TrainConfig, model: nn.Module, parallel: ParallelContext) -> Optimization:
    """ZeRO-1 AdamW over this rank's parameters, its loss scaler (on for fp16), the lr and beta2
    schedules."""
    scaler_cfg, adam, zero_cfg = config.grad_scaler, config.adam, config.hybrid_zero_optimizer
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
    settings = AdamSettings(
        lr=adam.lr,
        beta1=adam.adam_beta1,
        beta2=adam.adam_beta2,
        eps=adam.adam_eps,
        weight_decay=adam.weight_decay,
    )
    optimizer = ZeroOptimizer(
        list(model.parameters()),
        settings,
        scaler,
        clip_grad_norm=zero_cfg.clip_grad_norm,
        data_group=parallel.data_group,
        data_size=parallel.dp_size,
        zero_group=parallel.zero_group,
        zero_ranks=parallel.zero_ranks,
        zero_rank=parallel.zero_rank,
        pipeline_group=parallel.pipeline_group,
        overlap_grad_reduce=zero_cfg.overlap_sync_grad,
        reduce_bucket_size=zero_cfg.reduce_bucket_size,
    )
    use_global_grad_norm(optimizer, parallel)  # tensor parallelism: norm over the tensor group too
    if zero_cfg.overlap_sync_param and optimizer.zero_group is not None:
        optimizer.overlap_param_sync(list(model.chunks) if isinstance(model, StageChunks) else [model])
        log.info("ZeRO-1 parameter broadcast overlapped with the next forward (overlap_sync_param)")
    if optimizer.grad_reducer is not None:
        log.info(
            "data-parallel gradient all-reduce overlapped with backward: %d buckets of <= %s elements",
            len(optimizer.grad_reducer.buckets),
            f"{zero_cfg.reduce_bucket_size:,}",
        )
    # The seed's start-up line: how evenly ZeRO-1 split this stage's parameters over its group.
    log.info(
        "Number of elements on ranks: %s, rank:%d",
        [end - start for start, end in optimizer.ranges],
        parallel.rank,
    )
    lr_cfg, beta2_cfg = config.lr_scheduler, config.beta2_scheduler
    return Optimization(
        optimizer=optimizer,
        lr=WarmupCosineLR(
            base_lr=adam.lr,
            total_steps=lr_cfg.total_steps,
            warmup_ratio=lr_cfg.warmup_ratio,
            eta_min=lr_cfg.eta_min,
            init_steps=lr_cfg.init_steps,
        ),
        beta2=Beta2Schedule(init_beta2=beta2_cfg.init_beta2, c=beta2_cfg.c),
    )
