"""Forward and backward over one step's micro-batches (gradient accumulation), one process.

The loss of each micro-batch is InternLM's: cross entropy over the tokens that have a label,
averaged within the micro-batch, divided by micro_num; the scaled loss is what backward sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train_kernel.data.batches import MicroBatch
from train_kernel.train.token_metrics import IGNORE_INDEX, TokenMetrics


@dataclass(frozen=True)
class StepLoss:
    loss: float  # mean of the micro-batch losses: the log line's `loss`
    segments_per_micro_batch: list[int]
    largest_length: int


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
    logits: torch.Tensor, micro: MicroBatch, label_smoothing: float, metrics: TokenMetrics
) -> torch.Tensor:
    """The micro-batch loss; the per-token cross entropy behind it also feeds the metrics, so the
    vocabulary-sized softmax runs once (twice only with label smoothing, whose loss is not the
    metric's plain cross entropy)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = micro.labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return flat_logits.sum() * 0.0  # padding only: a zero that still reaches every parameter
    token_losses = F.cross_entropy(flat_logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    with torch.no_grad():
        correct = flat_logits.argmax(-1) == labels
    metrics.update_from_losses(token_losses.detach(), correct, labels, micro.type_ids)
    if label_smoothing:
        return micro_batch_loss(logits, micro.labels, label_smoothing)
    return token_losses.sum() / valid.sum()


def forward_backward(
    model: nn.Module,
    micro_batches: list[MicroBatch],
    loss_scale: float,
    label_smoothing: float,
    metrics: TokenMetrics,
) -> StepLoss:
    total = 0.0
    count = len(micro_batches)
    for micro in micro_batches:
        logits = model(micro.input_ids, micro.position_ids, micro.cu_seqlens, micro.max_seqlen)
        loss = _loss_and_metrics(logits, micro, label_smoothing, metrics) / count
        (loss * loss_scale).backward()
        total += loss.item()
    return StepLoss(
        loss=total,
        segments_per_micro_batch=[m.segments for m in micro_batches],
        largest_length=max(m.max_seqlen for m in micro_batches),
    )


@torch.no_grad()
def forward_only(model: nn.Module, micro: MicroBatch, label_smoothing: float, metrics: TokenMetrics) -> float:
    logits = model(micro.input_ids, micro.position_ids, micro.cu_seqlens, micro.max_seqlen)
    metrics.update(logits, micro.labels, micro.type_ids)
    return micro_batch_loss(logits, micro.labels, label_smoothing).item()
