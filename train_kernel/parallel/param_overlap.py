"""ZeRO-1's parameter synchronisation overlapped with the next forward (InternLM's
`hybrid_zero_optimizer.overlap_sync_param`).

After an update each rank of a ZeRO group owns the new weights of one slice of the flat parameter
vector. Instead of broadcasting every slice and waiting before the step returns, `start()` issues
the broadcasts asynchronously, in slice order (the same order on every rank), and returns. A
forward pre-hook on each module that holds parameters waits only for the slices that cover them
(and the earlier ones: the broadcasts complete in order), so the first layers compute while the
later slices are still on the wire. A forward post-hook on each root module, the optimizer step,
checkpoint capture and `wait_all()` complete whatever is left, so no reader ever sees a stale
weight (the head's weight is read by the fused loss outside any module's forward).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


class OverlappedParamSync:
    def __init__(
        self,
        params: Sequence[nn.Parameter],
        ranges: Sequence[tuple[int, int]],
        zero_ranks: Sequence[int],
        group: dist.ProcessGroup,
        roots: Iterable[nn.Module],
    ) -> None:
        self.params = list(params)
        self.ranges = list(ranges)
        self.owners = list(zero_ranks)
        self.group = group
        offsets, offset = {}, 0
        for p in self.params:
            offsets[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
        self._offsets = offsets
        self._pending: list[tuple[int, torch.Tensor, object]] = []  # (slice index, buffer, work handle)
        self.waited_in_forward = 0  # slices completed from a layer's pre-hook in the last step (tests)
        self._hooks = []
        for root in roots:
            for module in root.modules():
                own = [p for p in module.parameters(recurse=False) if id(p) in offsets]
                if own:
                    last = max(self._last_slice(p) for p in own)
                    self._hooks.append(module.register_forward_pre_hook(self._pre_hook(last)))
            self._hooks.append(root.register_forward_hook(lambda *_: self.wait_all()))

    def _last_slice(self, param: nn.Parameter) -> int:
        start, end = self._offsets[id(param)]
        return max(i for i, (lo, hi) in enumerate(self.ranges) if lo < end and hi > start)

    def _pre_hook(self, last_slice: int):
        def hook(module, args):
            if self._pending:
                self.wait_through(last_slice, from_forward=True)

        return hook

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    @torch.no_grad()
    def start(self) -> None:
        """Issues every slice's broadcast from its owner; returns without waiting."""
        self.wait_all()
        self.waited_in_forward = 0
        me = dist.get_rank()
        dtype, device = self.params[0].dtype, self.params[0].device
        for index, (owner, (start, end)) in enumerate(zip(self.owners, self.ranges)):
            if start == end:
                continue
            buffer = torch.empty(end - start, dtype=dtype, device=device)
            if me == owner:
                for view, lo, hi in self._pieces(start, end):
                    buffer[lo:hi].copy_(view)
            work = dist.broadcast(buffer, src=owner, group=self.group, async_op=True)
            self._pending.append((index, buffer, work))

    @torch.no_grad()
    def wait_through(self, last_slice: int, from_forward: bool = False) -> None:
        me = dist.get_rank()
        while self._pending and self._pending[0][0] <= last_slice:
            index, buffer, work = self._pending.pop(0)
            work.wait()
            if me != self.owners[index]:
                start, end = self.ranges[index]
                for view, lo, hi in self._pieces(start, end):
                    view.copy_(buffer[lo:hi])
            self.waited_in_forward += from_forward

    def wait_all(self) -> None:
        self.wait_through(len(self.ranges))

    def _pieces(self, start: int, end: int):
        for p in self.params:
            p_start, p_end = self._offsets[id(p)]
            lo, hi = max(start, p_start), min(end, p_end)
            if lo < hi:
                yield p.view(-1)[lo - p_start : hi - p_start], lo - start, hi - start

    def remove(self) -> None:
        self.wait_all()
        for handle in self._hooks:
            handle.remove()
