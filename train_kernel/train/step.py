"""Forward and backward over one step's micro-batches (gradient accumulation), one process.

The loss of each micro-batch is InternLM's: cross entropy over the tokens that have a label,
averaged within the micro-batch, divided by micro_num; the scaled loss is what backward sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train_kernel.data.batches import MicroBatch
from train_kernel.parallel.stage import StageLoss
from train_kernel.train.fused_loss import head_cross_entropy
from train_kernel.train.token_metrics import IGNORE_INDEX, TokenMetrics


@dataclass(frozen=True)
class StepLoss:
    loss: float  # mean of the micro-batch losses: the log line's `loss`
    segments_per_micro_batch: list[int]
    largest_length: int

    @classmethod
    def of(cls, micro_batches: list[MicroBatch], loss: float) -> StepLoss:
        """The step's record: `loss` and the shape of its micro-batches."""
        return cls(
            loss=loss,
            segments_per_micro_batch=[m.segments for m in micro_batches],
            largest_length=max(m.max_seqlen for m in micro_batches),
        )


def micro_batch_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if not bool((labels != IGNORE_INDEX).any()):
        # A row of padding only: zero loss that still reaches every parameter (no nan from a mean
        # over nothing).
        return logits.float().sum() * 0.0
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def _loss_and_metrics(
    model: nn.Module, micro: MicroBatch, label_smoothing: float, metrics: TokenMetrics
) -> torch.Tensor:
    """The micro-batch loss through the fused head + cross entropy (one pass over the vocabulary,
    no [T, V] fp32 logits); its per-token losses and hits feed the metrics."""
    hidden = model(micro.input_ids, micro.position_ids, micro.cu_seqlens, micro.max_seqlen, apply_head=False)
    return head_loss(model, hidden, micro, label_smoothing, metrics)


def head_loss(
    model: nn.Module, hidden: torch.Tensor, micro: MicroBatch, label_smoothing: float, metrics: TokenMetrics
) -> torch.Tensor:
    """The micro-batch loss from the normed final hidden states (the model's, or the last pipeline
    stage's output) through the fused head + cross entropy; feeds the metrics."""
    head = model.head.weight
    out = head_cross_entropy(hidden.to(head.dtype), head, micro.labels, label_smoothing)
    metrics.update_from_losses(out.token_losses, out.correct, micro.labels, micro.type_ids)
    return out.loss


def step_loss_share(label_smoothing: float, metrics: TokenMetrics, micro_num: int) -> StageLoss:
    """The pipeline schedules' last-stage loss (parallel.stage.StageLoss) for one step: each
    micro-batch's head loss divided by the step's micro_num, as one process computes it."""
    return lambda part, hidden, micro: head_loss(part, hidden, micro, label_smoothing, metrics) / micro_num


def validation_loss(
    logits: torch.Tensor, micro: MicroBatch, label_smoothing: float, metrics: TokenMetrics
) -> float:
    """A validation micro-batch's loss from its logits; feeds the metrics."""
    metrics.update(logits, micro.labels, micro.type_ids)
    return micro_batch_loss(logits, micro.labels, label_smoothing).item()


def forward_backward(
    model: nn.Module,
    micro_batches: list[MicroBatch],
    loss_scale: float,
    label_smoothing: float,
    metrics: TokenMetrics,
    before_last_backward: Callable[[], None] | None = None,
) -> StepLoss:
    """`before_last_backward` runs right before the last micro-batch's backward (the overlapped
    data-parallel gradient reduction starts there)."""
    total = 0.0
    count = len(micro_batches)
    for index, micro in enumerate(micro_batches):
        loss = _loss_and_metrics(model, micro, label_smoothing, metrics) / count
        if before_last_backward is not None and index == count - 1:
            before_last_backward()
        (loss * loss_scale).backward()
        total += loss.item()
    return StepLoss.of(micro_batches, total)


@torch.no_grad()
def forward_only(model: nn.Module, micro: MicroBatch, label_smoothing: float, metrics: TokenMetrics) -> float:
    logits = model(micro.input_ids, micro.position_ids, micro.cu_seqlens, micro.max_seqlen)
    return validation_loss(logits, micro, label_smoothing, metrics)
