"""Data-parallel gradient averaging overlapped with backward (InternLM's
`hybrid_zero_optimizer.overlap_sync_grad` with `reduce_bucket_size`).

The parameters are grouped into buckets of at most `bucket_elements` gradient elements, in reverse
parameter order (roughly the order backward finishes them). During the last micro-batch's backward
only (`arm()` before it; earlier micro-batches only accumulate), a post-accumulate-grad hook marks
each parameter ready; a complete bucket is flattened and its all-reduce (sum) started asynchronously.
Buckets are started strictly in bucket order (a complete bucket waits for the earlier ones), so every
rank issues the same collectives in the same order whatever order its backward finishes them in.
`finish()`, before the optimizer step, starts what is left, waits for every handle and writes sum /
size back into the gradients: the same sums as collectives.average_gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from train_kernel.parallel.collectives import _buckets


class OverlappedGradReducer:
    def __init__(
        self, params: Sequence[nn.Parameter], group: dist.ProcessGroup | None, size: int, bucket_elements: int
    ) -> None:
        self.group = group
        self.size = size
        self.buckets: list[list[nn.Parameter]] = list(_buckets(list(reversed(list(params))), bucket_elements))
        self._bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket}
        self._armed = False
        self._armed_ids: set[int] = set()  # parameters armed one model piece at a time
        self._reset()
        self.started_during_backward = 0  # buckets started from a hook in the last step (for tests)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    def arm(self) -> None:
        """Called right before the last micro-batch's backward: from now on a complete bucket is
        reduced at once."""
        self._reset()
        self._armed = True
        self.started_during_backward = 0

    def arm_parameters(self, params) -> None:
        """Arms only `params` (one model piece), right before that piece's last backward of the step:
        under an interleaved pipeline schedule the pieces of a rank end their backwards at different
        times, and a piece armed early would count an earlier micro-batch's accumulation as final."""
        if not self._armed and not self._armed_ids:
            self._reset()
            self.started_during_backward = 0
        self._armed_ids.update(id(p) for p in params)

    def _reset(self) -> None:
        self._ready: list[int] = [0] * len(self.buckets)
        self._seen: set[int] = set()
        self._next = 0  # first bucket not yet started
        self._pending: list[tuple[torch.Tensor, dist.Work]] = []

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not (self._armed or id(param) in self._armed_ids) or id(param) in self._seen:
            return
        self._seen.add(id(param))
        index = self._bucket_of[id(param)]
        self._ready[index] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._start(self._next)
            self.started_during_backward += 1
            self._next += 1

    @torch.no_grad()
    def _start(self, index: int) -> None:
        bucket = self.buckets[index]
        for p in bucket:
            if p.grad is None:  # no gradient on this rank: zeros, as average_gradients counts it
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        # NOTE: async sum of this bucket over the data-parallel ranks while backward goes on with
        # the earlier layers; the same sum / dp as average_gradients (each rank's gradients are
        # of its own rows of the global batch).
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._pending.append((flat, work))

    @torch.no_grad()
    def finish(self) -> None:
        """Every gradient replaced by its mean over the group. Without `arm()` (a schedule that does
        not announce its last backward) every bucket is reduced here, after backward."""
        for index in range(self._next, len(self.buckets)):
            self._start(index)
        self._armed = False
        self._armed_ids = set()
        for (flat, work), bucket in zip(self._pending, self.buckets):
            # NOTE: sync point before the optimizer step: the step reads every averaged gradient,
            # so each bucket's all-reduce must have completed before its values are copied back.
            work.wait()
            flat.div_(self.size)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        self._reset()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
