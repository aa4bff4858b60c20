"""How this rank runs a step's forwards and backwards, and a validation forward: one object chosen
once at start (`build_step_schedule`), so the loop never asks which kind of run it is in.

- one process, or data parallel only: the whole model, micro-batch after micro-batch;
- a pipeline stage under PyTorch's engine (the default; parallel/engine_schedule.py);
- a pipeline stage under the project's own 1F1B or interleaved schedule (`pipeline.schedule =
  "InternLM"`, or a micro_num PyTorch's schedules cannot run).
Validation always goes through the project's forward path of the stage (one micro-batch at a time).

The pipeline schedules in parallel/ move tensors between stages; what the loss is (the fused head
+ cross entropy, divided by micro_num) and which metrics it feeds is said here, and handed to them
as a `StageLoss`. So train/ imports parallel/, never the other way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from train_kernel.data.batches import MicroBatch
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
from train_kernel.train.fused_loss import backward_more_than_once
from train_kernel.train.step import (
    StepLoss,
    forward_backward,
    forward_only,
    step_loss_share,
    validation_loss,
)
from train_kernel.train.token_metrics import TokenMetrics

if TYPE_CHECKING:
    # EngineSchedule is imported where a pipeline uses it: torch.distributed.pipelining adds 0.8 s to
    # the start of every process.
    from train_kernel.config import TrainConfig
    from train_kernel.optim.zero import ZeroOptimizer
    from train_kernel.parallel.engine_schedule import EngineSchedule

log = logging.getLogger(__name__)


class StepSchedule(Protocol):
    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_scale: float, metrics: TokenMetrics
    ) -> StepLoss:
        """One training step's forwards and backwards (gradients accumulate in the parameters);
        the loss is the step's on the rank that computes it (the last stage), 0.0 elsewhere."""

    def forward_only(self, micro: MicroBatch, metrics: TokenMetrics) -> float | None:
        """The micro-batch's validation loss where it is computed (the last stage), else None."""


@dataclass(frozen=True, kw_only=True)
class WholeModel:
    model: nn.Module
    label_smoothing: float
    before_last_backward: Callable[[], None] | None

    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_scale: float, metrics: TokenMetrics
    ) -> StepLoss:
        return forward_backward(
            self.model,
            micro_batches,
            loss_scale,
            self.label_smoothing,
            metrics,
            before_last_backward=self.before_last_backward,
        )

    def forward_only(self, micro: MicroBatch, metrics: TokenMetrics) -> float:
        return forward_only(self.model, micro, self.label_smoothing, metrics)


@dataclass(frozen=True, kw_only=True)
class ProjectPipeline:
    """The project's 1F1B schedule (one model chunk per stage)."""

    model: nn.Module
    links: StageLinks
    label_smoothing: float
    before_last_backward: Callable[[], None] | None

    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_scale: float, metrics: TokenMetrics
    ) -> StepLoss:
        loss = pipeline_forward_backward(
            self.model,
            micro_batches,
            loss_scale=loss_scale,
            loss_fn=step_loss_share(self.label_smoothing, metrics, len(micro_batches)),
            links=self.links,
            before_last_backward=self.before_last_backward,
        )
        return StepLoss.of(micro_batches, loss)

    def forward_only(self, micro: MicroBatch, metrics: TokenMetrics) -> float | None:
        logits = pipeline_forward_only(self.model, micro, self.links)
        return None if logits is None else validation_loss(logits, micro, self.label_smoothing, metrics)


@dataclass(frozen=True, kw_only=True)
class ProjectInterleaved:
    """The project's interleaved 1F1B schedule (model.num_chunks > 1 chunks per stage)."""

    chunks: list[nn.Module]
    ring: ChunkRing
    label_smoothing: float

    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_scale: float, metrics: TokenMetrics
    ) -> StepLoss:
        loss = interleaved_forward_backward(
            self.chunks,
            micro_batches,
            loss_scale=loss_scale,
            loss_fn=step_loss_share(self.label_smoothing, metrics, len(micro_batches)),
            ring=self.ring,
        )
        return StepLoss.of(micro_batches, loss)

    def forward_only(self, micro: MicroBatch, metrics: TokenMetrics) -> float | None:
        logits = interleaved_forward_only(self.chunks, micro, self.ring)
        return None if logits is None else validation_loss(logits, micro, self.label_smoothing, metrics)


@dataclass(frozen=True, kw_only=True)
class EnginePipeline:
    """Training steps through PyTorch's engine; validation through the project's stage path."""

    engine: EngineSchedule
    validation: StepSchedule
    label_smoothing: float

    def forward_backward(
        self, micro_batches: list[MicroBatch], loss_scale: float, metrics: TokenMetrics
    ) -> StepLoss:
        # NOTE: the zero-bubble schedule backpropagates the loss twice (input, then weight
        # gradients): the fused loss must keep its gradient buffer out of its pool for that step.
        with backward_more_than_once() if self.engine.splits_backward else nullcontext():
            loss = self.engine.forward_backward(
                micro_batches,
                loss_scale=loss_scale,
                loss_fn=step_loss_share(self.label_smoothing, metrics, len(micro_batches)),
            )
        return StepLoss.of(micro_batches, loss)

    def forward_only(self, micro: MicroBatch, metrics: TokenMetrics) -> float | None:
        return self.validation.forward_only(micro, metrics)


def build_step_schedule(
    *,
    config: TrainConfig,
    model: nn.Module,
    optimizer: ZeroOptimizer,
    parallel: ParallelContext,
    device: torch.device,
) -> StepSchedule:
    """The schedule this rank runs, from the config and the model part it holds."""
    smoothing = config.loss.label_smoothing
    if parallel.pp_size == 1:
        return WholeModel(
            model=model, label_smoothing=smoothing, before_last_backward=optimizer.before_last_backward
        )
    dtype = activation_dtype(config.model)
    if isinstance(model, StageChunks):
        ring = ChunkRing(
            stage=parallel.pp_rank,
            pipeline_ranks=parallel.pipeline_ranks,
            num_chunks=config.model.num_chunks,
            hidden_size=config.model.hidden_size,
            dtype=dtype,
            device=device,
        )
        project: StepSchedule = ProjectInterleaved(
            chunks=list(model.chunks), ring=ring, label_smoothing=smoothing
        )
    else:
        links = StageLinks(
            stage=parallel.pp_rank,
            num_stages=parallel.pp_size,
            prev_rank=parallel.prev_stage_rank,
            next_rank=parallel.next_stage_rank,
            hidden_size=config.model.hidden_size,
            dtype=dtype,
            device=device,
        )
        project = ProjectPipeline(
            model=model,
            links=links,
            label_smoothing=smoothing,
            before_last_backward=optimizer.before_last_backward,
        )
    name = config.pipeline_engine_schedule()
    if parallel.rank == 0:
        log.info("pipeline schedule: %s", name or "the project's own (InternLM's order)")
    if name is None:
        return project
    from train_kernel.parallel.engine_schedule import EngineSchedule

    reducer = optimizer.grad_reducer
    engine = EngineSchedule(
        name=name,
        parts=list(model.chunks) if isinstance(model, StageChunks) else [model],
        stage=parallel.pp_rank,
        num_stages=parallel.pp_size,
        micro_num=config.data.micro_num,
        group=parallel.pipeline_group,
        device=device,
        tokens=config.data.seq_len * config.data.micro_bsz,
        hidden_size=config.model.hidden_size,
        activation_dtype=dtype,
        arm_for=(lambda part: reducer.arm_parameters(part.parameters())) if reducer else None,
    )
    return EnginePipeline(engine=engine, validation=project, label_smoothing=smoothing)
