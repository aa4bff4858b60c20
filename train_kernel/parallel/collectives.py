"""The data-parallel collectives of a training step, each a no-op without a group: gradient
averaging, and the sum of the per-step statistics that the log line reports for the whole job."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

# Gradient elements flattened into one all-reduce: few large messages instead of one per tensor,
# with a bounded extra buffer (not a second copy of every gradient).
DEFAULT_BUCKET_ELEMENTS = 32 * 1024 * 1024


def _buckets(params: Sequence[nn.Parameter], bucket_elements: int) -> Iterable[list[nn.Parameter]]:
    bucket: list[nn.Parameter] = []
    size = 0
    for p in params:
        if bucket and size + p.numel() > bucket_elements:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(
    params: Sequence[nn.Parameter],
    group: dist.ProcessGroup | None,
    size: int,
    bucket_elements: int = DEFAULT_BUCKET_ELEMENTS,
) -> None:
    """Replaces every gradient by its mean over the `size` ranks of `group` (sum, then / size).

    A parameter without a gradient counts as zeros, so that every rank flattens the same tensors in
    the same order. Gradients are summed in their own dtype (as InternLM does): an inf/nan on any
    rank reaches every rank, which is what makes the overflow skip unanimous."""
    if group is None or size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params, bucket_elements):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        # NOTE: data-parallel ranks computed gradients on different rows of one global batch; their
        # sum / dp is the gradient of the global batch's loss (the mean of the micro-batch losses).
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(size)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def sum_over(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`values` summed over `group` (in place; returned as is without a group)."""
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values
