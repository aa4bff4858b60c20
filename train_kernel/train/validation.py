"""A validation pass over one validation set, through the run's step schedule (`forward_only`):
each data-parallel rank takes a disjoint share of the batches, the sums make the record the whole
set's, as one process would compute it."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from train_kernel.data.batches import RowSource, to_micro_batches
from train_kernel.data.row_sources import validation_record
from train_kernel.parallel.process_groups import ParallelContext
from train_kernel.train.step_schedule import StepSchedule
from train_kernel.train.token_metrics import TokenMetrics


def validate(
    *,
    name: str,
    model: nn.Module,
    schedule: StepSchedule,
    rows: RowSource,
    batch_rows: int,
    parallel: ParallelContext,
    device: torch.device,
    step: int,
) -> dict[str, Any]:
    """The record of validation set `name` at `step`: loss and token metrics over the set
    (`val/...`), in batches of `batch_rows` rows."""
    metrics = TokenMetrics(rows.type_names)
    losses = []
    model.eval()
    started = time.perf_counter()
    # Data-parallel rank r validates the batches r, r + dp, r + 2 dp, ... of the split.
    dp_rank, dp_size = parallel.dp_rank, parallel.dp_size
    for start in range(dp_rank * batch_rows, len(rows), batch_rows * dp_size):
        batch = rows.batch(range(start, min(start + batch_rows, len(rows))))
        for micro in to_micro_batches(batch, device):
            loss = schedule.forward_only(micro, metrics)
            if loss is not None:  # the last stage's
                losses.append(loss)
    model.train()
    packed = torch.cat(
        [torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64), metrics.sums.reshape(-1)]
    )
    packed = parallel.sum_over_job(packed, device)
    metrics.sums.copy_(packed[2:].view_as(metrics.sums))
    loss_sum, count = packed[:2].tolist()
    seconds = round(time.perf_counter() - started, 2)
    return validation_record(name, step, loss_sum / max(count, 1), metrics.summary(), seconds)
