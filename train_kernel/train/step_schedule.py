"""How this rank runs a step's forwards and backwards, and a validation forward: one object chosen
once at start (`build_step_schedule`), so the loop never asks which kind of run it is in.

- one process, or data parallel only: the whole model, micro-batch after micro-batch;
- a pipeline stage under PyTorch's engine (the default; parallel/engine_schedule.py);
- a pipeline stage under the project's own 1F1B or interleaved schedule (`pipeline.schedule =
  "InternLM"`, or a micro_num PyTorch's schedules cannot run).
Validation always goes through the project's forward path of the stage (one micro-batch at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from train_kernel.data.batches import MicroBatch
from train_kernel.parallel.engine_schedule import EngineSchedule
from train_kernel.parallel.interleaved_schedule import (
    ChunkRing,
    interleaved_forward_backward,
    interleaved_forward_only,
)
from train_kernel.parallel.pipeline_schedule import (
    StageLinks,
    pipeline_forward_backward,
    pipeline_forward_only,
)
from train_kernel.parallel.process_groups import ParallelContext
from train_kernel.parallel.stage import StageChunks, activation_dtype
from train_kernel.train.step import StepLoss, forward_backward, forward_only
from train_kernel.train.token_metrics import TokenMetrics


class StepSchedule(Protocol):
    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_scale: float, metrics: TokenMetrics
    ) -> StepLoss: ...

    def forward_only(self, micro: MicroBatch, metrics: TokenMetrics) -> float | None:
        """The micro-batch's validation loss where it is computed (the last stage), else None."""


class WholeModel:
    def __init__(
        self, model: nn.Module, label_smoothing: float, before_last_backward: Callable[[], None] | None
    ) -> None:
        self.model, self.label_smoothing, self.before_last_backward = (
            model,
            label_smoothing,
            before_last_backward,
        )

    def forward_backward(self, micro_batches, loss_scale, metrics) -> StepLoss:
        return forward_backward(
            self.model,
            micro_batches,
            loss_scale,
            self.label_smoothing,
            metrics,
            before_last_backward=self.before_last_backward,
        )

    def forward_only(self, micro, metrics) -> float:
        return forward_only(self.model, micro, self.label_smoothing, metrics)


class ProjectPipeline:
    """The project's 1F1B schedule (one model chunk per stage)."""

    def __init__(
        self, model, links: StageLinks, parallel: ParallelContext, label_smoothing, before_last_backward
    ):
        self.model, self.links, self.parallel = model, links, parallel
        self.label_smoothing, self.before_last_backward = label_smoothing, before_last_backward

    def forward_backward(self, micro_batches, loss_scale, metrics) -> StepLoss:
        return pipeline_forward_backward(
            self.model,
            micro_batches,
            loss_scale,
            self.label_smoothing,
            metrics,
            self.links,
            self.parallel.pp_rank,
            self.parallel.pp_size,
            before_last_backward=self.before_last_backward,
        )

    def forward_only(self, micro, metrics) -> float | None:
        return pipeline_forward_only(self.model, micro, self.label_smoothing, metrics, self.links)


class ProjectInterleaved:
    """The project's interleaved 1F1B schedule (model.num_chunks > 1 chunks per stage)."""

    def __init__(self, model: StageChunks, ring: ChunkRing, label_smoothing: float) -> None:
        self.chunks, self.ring, self.label_smoothing = list(model.chunks), ring, label_smoothing

    def forward_backward(self, micro_batches, loss_scale, metrics) -> StepLoss:
        return interleaved_forward_backward(
            self.chunks, micro_batches, loss_scale, self.label_smoothing, metrics, self.ring
        )

    def forward_only(self, micro, metrics) -> float | None:
        return interleaved_forward_only(self.chunks, micro, self.label_smoothing, metrics, self.ring)


class EnginePipeline:
    """Training steps through PyTorch's engine; validation through the project's stage path."""

    def __init__(self, engine: EngineSchedule, validation: StepSchedule) -> None:
        self.engine, self.validation = engine, validation

    def forward_backward(self, micro_batches, loss_scale, metrics) -> StepLoss:
        return self.engine.forward_backward(micro_batches, loss_scale, metrics)

    def forward_only(self, micro, metrics) -> float | None:
        return self.validation.forward_only(micro, metrics)


def build_step_schedule(config, model: nn.Module, optimizer, parallel: ParallelContext, device: torch.device):
    """The schedule this rank runs, from the config and the model part it holds."""
    smoothing = config.loss.label_smoothing
    if parallel.pp_size == 1:
        return WholeModel(model, smoothing, optimizer.before_last_backward)
    dtype = activation_dtype(config.model)
    if isinstance(model, StageChunks):
        ring = ChunkRing(
            parallel.pp_rank,
            parallel.pipeline_ranks,
            config.model.num_chunks,
            config.model.hidden_size,
            dtype,
            device,
        )
        project: StepSchedule = ProjectInterleaved(model, ring, smoothing)
    else:
        links = StageLinks(
            parallel.prev_stage_rank, parallel.next_stage_rank, config.model.hidden_size, dtype, device
        )
        project = ProjectPipeline(model, links, parallel, smoothing, optimizer.before_last_backward)
    name = config.pipeline_engine_schedule()
    if name is None:
        return project
    reducer = optimizer.grad_reducer
    engine = EngineSchedule(
        name,
        list(model.chunks) if isinstance(model, StageChunks) else [model],
        parallel.pp_rank,
        parallel.pp_size,
        config.data.micro_num,
        parallel.pipeline_group,
        device,
        smoothing,
        tokens=config.data.seq_len * config.data.micro_bsz,
        hidden_size=config.model.hidden_size,
        activation_dtype=dtype,
        arm_for=(lambda part: reducer.arm_parameters(part.parameters())) if reducer else None,
    )
    return EnginePipeline(engine, project)
