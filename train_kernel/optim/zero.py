"""ZeRO-1 around HybridAdamW: each rank of a ZeRO group keeps the fp32 master weights and Adam
moments of one contiguous slice of the flattened parameters (partition_ranges), steps that slice,
then the group exchanges the updated low-precision slices so every rank holds the whole model.

One step:
1. gradients averaged over the data-parallel group (collectives.average_gradients after backward,
   or, with overlap_grad_reduce, grad_overlap.OverlappedGradReducer: bucket all-reduces started
   during the last micro-batch's backward, waited for here);
2. HybridAdamW.step on this rank's slice; the squared norm is summed over the ZeRO group (the
   ranks that hold distinct slices) and, with pipeline parallelism, over the pipeline group (the
   stages hold distinct parameters), so the clip factor and the overflow skip are global;
3. after an update, each slice is broadcast by its owner to the rest of its ZeRO group.
With zero size 1 (zero1=1) every rank owns the whole vector and steps 2-3 need no communication.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from train_kernel.optim.hybrid_adamw import AdamSettings, HybridAdamW, StepResult
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.parallel.collectives import average_gradients
from train_kernel.parallel.grad_overlap import OverlappedGradReducer
from train_kernel.parallel.param_overlap import OverlappedParamSync
from train_kernel.parallel.zero_partition import partition_ranges


def _pieces(params: Sequence[nn.Parameter], start: int, end: int) -> Iterator[tuple[torch.Tensor, int, int]]:
    """(flat view of a parameter's elements, slice start, slice end) for the parts of the
    flattened parameter vector [start, end), positions relative to `start`."""
    offset = 0
    for p in params:
        n = p.numel()
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            yield p.view(-1)[lo - offset : hi - offset], lo - start, hi - start
        offset += n


class ZeroOptimizer:
    """HybridAdamW's interface (step, scaler, export_state / import_state) for a data-parallel rank."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        settings: AdamSettings,
        scaler: DynamicLossScaler,
        clip_grad_norm: float,
        *,
        data_group: dist.ProcessGroup | None = None,
        data_size: int = 1,
        zero_group: dist.ProcessGroup | None = None,
        zero_ranks: Sequence[int] = (0,),
        zero_rank: int = 0,
        pipeline_group: dist.ProcessGroup | None = None,
        overlap_grad_reduce: bool = False,
        reduce_bucket_size: int = 512 * 1024 * 1024,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"ZeRO-1 needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self.data_group = data_group
        self.data_size = data_size
        self.zero_group = zero_group if len(zero_ranks) > 1 else None
        self.zero_ranks = list(zero_ranks)
        self.pipeline_group = pipeline_group
        # Overlap only where there is something to reduce: one data-parallel rank (or overlap off)
        # keeps the plain path.
        self.grad_reducer = (
            OverlappedGradReducer(self.params, data_group, data_size, reduce_bucket_size)
            if overlap_grad_reduce and data_group is not None and data_size > 1
            else None
        )
        self.param_sync: OverlappedParamSync | None = None
        numel = sum(p.numel() for p in self.params)
        self.ranges = partition_ranges(numel, len(self.zero_ranks))
        self.inner = HybridAdamW(
            self.params,
            settings,
            scaler,
            clip_grad_norm=clip_grad_norm,
            partition=self.ranges[zero_rank],
            reduce_norm=self._sum_over_model,
        )

    @property
    def scaler(self) -> DynamicLossScaler:
        return self.inner.scaler

    def _sum_over_model(self, squared: torch.Tensor) -> torch.Tensor:
        if self.zero_group is not None:
            # NOTE: each rank of the ZeRO group holds the norm of its own slice only; the sum is the
            # squared norm of the whole gradient, so every rank clips by the same factor and an
            # inf/nan in any slice makes every rank skip the step together.
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self.zero_group)
        if self.pipeline_group is not None:
            # NOTE: after the ZeRO sum this is the squared norm of this stage's gradients; the stages
            # hold disjoint parameters, so their sum is the whole model's: every stage clips by the
            # same factor and skips an overflowed step together.
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self.pipeline_group)
        return squared

    def before_last_backward(self) -> None:
        """The schedules call this right before the step's last backward (gradient accumulation:
        the earlier micro-batches must not communicate); it lets the overlapped reduction start."""
        if self.grad_reducer is not None:
            self.grad_reducer.arm()

    def overlap_param_sync(self, roots: Sequence[nn.Module]) -> None:
        """From now on the updated slices reach the other ranks of the ZeRO group during the next
        forward (param_overlap.OverlappedParamSync); no-op without a ZeRO group."""
        if self.zero_group is not None and self.param_sync is None:
            self.param_sync = OverlappedParamSync(
                self.params, self.ranges, self.zero_ranks, self.zero_group, roots
            )

    def wait_params(self) -> None:
        """Completes an overlapped parameter broadcast still in flight (before reading weights
        outside a forward: checkpoints, exports)."""
        if self.param_sync is not None:
            self.param_sync.wait_all()

    def step(self, lr: float, beta2: float) -> StepResult:
        self.wait_params()
        if self.grad_reducer is not None:
            self.grad_reducer.finish()
        else:
            average_gradients(self.params, self.data_group, self.data_size)
        result = self.inner.step(lr=lr, beta2=beta2)
        if result.updated:  # global decision: every rank of the group takes this branch or none
            self._share_slices()
        return result

    @torch.no_grad()
    def _share_slices(self) -> None:
        if self.zero_group is None:
            return
        if self.param_sync is not None:
            self.param_sync.start()
            return
        dtype, device = self.params[0].dtype, self.params[0].device
        for owner, (start, end) in zip(self.zero_ranks, self.ranges):
            if start == end:
                continue
            buffer = torch.empty(end - start, dtype=dtype, device=device)
            if dist.get_rank() == owner:
                for view, lo, hi in _pieces(self.params, start, end):
                    buffer[lo:hi].copy_(view)
            # NOTE: only the owner stepped this slice; the broadcast gives the rest of the ZeRO
            # group the updated weights (in the model's dtype) for the next forward.
            dist.broadcast(buffer, src=owner, group=self.zero_group)
            if dist.get_rank() != owner:
                for view, lo, hi in _pieces(self.params, start, end):
                    view.copy_(buffer[lo:hi])

    @property
    def partition(self) -> tuple[int, int]:
        return self.inner.start, self.inner.end

    def export_state(self) -> dict:
        """This rank's checkpoint payload: its slice of the flat state (HybridAdamW.export_state),
        where the slice lies, and the loss scaler. Tensors and plain numbers only, so it loads with
        torch.load(weights_only=True)."""
        return {
            **self.inner.export_state(),
            "partition": list(self.partition),
            "numel": self.inner.numel,
            "zero_size": len(self.zero_ranks),
            "scaler": self.scaler.state_dict(),
        }

    def reset_master_from_model(self) -> None:
        self.inner.reset_master_from_model()

    def import_state(self, slices: Sequence[dict]) -> None:
        """Restores from the payloads of the ranks that saved this stage, whatever their ZeRO size:
        this rank takes elements [start, end) of their concatenation. One slice with this rank's
        exact range is the common case (same layout) and copies nothing extra."""
        slices = sorted(slices, key=lambda piece: piece["partition"][0])
        numel = self.inner.numel
        for piece in slices:
            if piece["numel"] != numel:
                raise ValueError(
                    f"optimizer state is for a stage of {piece['numel']:,} elements, "
                    f"this stage has {numel:,} (another model or pipeline layout)"
                )
        start, end = self.partition
        pieces = {name: [] for name in ("master", "exp_avg", "exp_avg_sq")}
        covered = start
        for piece in slices:
            lo, hi = piece["partition"]
            if hi <= start or lo >= end:
                continue
            if lo > covered:
                raise ValueError(f"optimizer state misses elements [{covered}, {lo}) of this rank's slice")
            take_lo, take_hi = max(lo, start) - lo, min(hi, end) - lo
            for name in pieces:
                pieces[name].append(piece[name].reshape(-1)[take_lo:take_hi])
            covered = min(hi, end)
        if covered < end:
            raise ValueError(f"optimizer state misses elements [{covered}, {end}) of this rank's slice")
        if start == end:
            joined = {name: torch.zeros(0) for name in pieces}
        else:
            joined = {name: torch.cat(values) for name, values in pieces.items()}
        self.inner.import_state(
            joined["master"], joined["exp_avg"], joined["exp_avg_sq"], float(slices[0]["step"])
        )
        self.scaler.load_state_dict(slices[0]["scaler"])
        self._share_slices()
