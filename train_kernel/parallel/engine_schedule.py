"""Training steps of a pipeline stage through PyTorch's pipelining engine
(`torch.distributed.pipelining`): Schedule1F1B, ScheduleInterleaved1F1B, or the zero-bubble
ScheduleInterleavedZeroBubble, chosen by `parallel.pipeline.schedule`.

What the engine sends between stages is each piece's output hidden states only: every stage holds
the step's micro-batches itself (each rank of the pipeline group reads the same rows), and every
schedule here runs a piece's forwards in micro-batch order, so the n-th forward of a piece in a
step is micro-batch n, whose positions and segment boundaries the piece looks up. The last piece's
output goes to the caller's `StageLoss` (the trainer's: the fused head + cross entropy, divided by
micro_num, which also feeds the token metrics, as one process does), multiplied here by the loss
scale (the engine's own gradient scaling is off).

Gradient-reduction overlap: for each piece, a pre-hook on the autograd node of its last
micro-batch's output (on the last piece, of the loss) arms the data-parallel reducer for that
piece's parameters right before their final accumulation. The zero-bubble schedule splits the
backward into input and weight gradients, so a piece's weight gradients for earlier micro-batches
may come after its last input gradient: there every bucket is reduced after the step instead.
That schedule also runs the loss's backward twice (`splits_backward`): the caller's loss must
allow it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from train_kernel.data.batches import MicroBatch
from train_kernel.parallel.stage import StageLoss

ENGINE_SCHEDULES = {
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
}
_SPLIT_BACKWARD = {"InterleavedZeroBubble"}  # input and weight gradients computed apart


class _Piece(nn.Module):
    """One model piece as the engine drives it: input ids or hidden states -> hidden states."""

    def __init__(self, part: nn.Module, step: _StepData, arm: Callable[[], None] | None) -> None:
        super().__init__()
        self.part = part
        self._step = step
        self._arm = arm
        self.forwards = 0  # in this step: the next forward is of micro-batch `forwards`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = self.forwards
        self.forwards += 1
        micro = self._step.micro_batches[position]
        hidden = self.part(x, micro.position_ids, micro.cu_seqlens, micro.max_seqlen, apply_head=False)
        if self._arm is not None and position == len(self._step.micro_batches) - 1 and hidden.grad_fn:
            # The backward of the last micro-batch through this piece starts at this node.
            hidden.grad_fn.register_prehook(lambda grad_outputs: self._arm())
        return hidden


class _StepData:
    """What the pieces and the loss of one step share: its micro-batches and their losses."""

    def __init__(self) -> None:
        self.micro_batches: list[MicroBatch] = []
        self.losses: list[torch.Tensor] = []


class EngineSchedule:
    """This rank's pieces under one of PyTorch's schedules. `parts`: the stage's model chunks in
    chunk order (one for 1F1B), part k being piece k * P + stage, as the project's stage builder
    cuts them. `arm_for(part)` arms the overlapped gradient reduction for one part's parameters."""

    def __init__(
        self,
        *,
        name: str,
        parts: Sequence[nn.Module],
        stage: int,
        num_stages: int,
        micro_num: int,
        group: dist.ProcessGroup,
        device: torch.device,
        tokens: int,
        hidden_size: int,
        activation_dtype: torch.dtype,
        arm_for: Callable[[nn.Module], None] | None = None,
    ) -> None:
        """`tokens`: a micro-batch's packed length; the pieces exchange [1, tokens, hidden_size]
        hidden states in `activation_dtype`. Giving the engine every shape up front spares it its
        metadata inference, which would run the pieces and the loss (and so the token metrics) on
        an empty micro-batch."""
        if name not in ENGINE_SCHEDULES:
            raise ValueError(
                f"unknown pipeline schedule {name!r}; expected one of {sorted(ENGINE_SCHEDULES)}"
            )
        self.name = name
        self.parts = list(parts)
        self.data = _StepData()
        self.loss_fn: StageLoss | None = None  # the step's, from forward_backward
        self.loss_scale = 1.0
        self.last_part = self.parts[-1] if stage == num_stages - 1 else None
        overlap = arm_for is not None and name not in _SPLIT_BACKWARD
        self.arm_for = arm_for if overlap else None
        pieces = len(self.parts) * num_stages
        meta = torch.device("meta")
        ids = torch.empty(1, tokens, dtype=torch.int64, device=meta)
        # requires_grad: the engine then gives the received hidden states a gradient to send back.
        hidden = torch.empty(1, tokens, hidden_size, dtype=activation_dtype, device=meta, requires_grad=True)
        last_hidden = torch.empty(1, tokens, hidden_size, dtype=_output_dtype(self.parts[-1]), device=meta)
        self.stages = []
        self.pieces: list[_Piece] = []
        for chunk, part in enumerate(self.parts):
            piece = chunk * num_stages + stage
            self.pieces.append(_Piece(part, self.data, (lambda p=part: arm_for(p)) if overlap else None))
            self.stages.append(
                PipelineStage(
                    self.pieces[-1],
                    piece,
                    pieces,
                    device,
                    input_args=ids if piece == 0 else hidden,
                    output_args=last_hidden if piece == pieces - 1 else hidden,
                    # Gradients have the hidden states' shape; the input ids of the first piece
                    # and the loss of the last take none from a neighbour.
                    input_grads=None if piece == 0 else hidden,
                    output_grads=None if piece == pieces - 1 else hidden,
                    group=group,
                )
            )
        schedule = ENGINE_SCHEDULES[name]
        common = {"n_microbatches": micro_num, "loss_fn": self._loss, "scale_grads": False}
        if len(self.stages) == 1 and name == "1F1B":
            self.schedule = schedule(self.stages[0], **common)
        else:
            self.schedule = schedule(self.stages, **common)

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        position = len(self.data.losses)  # the loss follows the last piece's forwards, in order
        count = len(self.data.micro_batches)
        micro = self.data.micro_batches[position]
        loss = self.loss_fn(self.last_part, hidden, micro)
        self.data.losses.append(loss.detach())
        scaled = loss * self.loss_scale
        if self.arm_for is not None and position == count - 1:
            scaled.grad_fn.register_prehook(lambda grad_outputs: self.arm_for(self.last_part))
        return scaled

    @property
    def splits_backward(self) -> bool:
        """Whether the schedule computes input and weight gradients apart, running the loss's
        backward twice."""
        return self.name in _SPLIT_BACKWARD

    def forward_backward(
        self, micro_batches: list[MicroBatch], *, loss_scale: float, loss_fn: StageLoss
    ) -> float:
        """One step's forwards and backwards on this rank (gradients accumulate in the parameters);
        returns the sum of the micro-batch losses on the rank holding the last piece, 0.0 elsewhere."""
        self.data.micro_batches, self.data.losses = micro_batches, []
        self.loss_fn, self.loss_scale = loss_fn, loss_scale
        for piece in self.pieces:
            piece.forwards = 0
        count = len(micro_batches)
        # Every rank passes the whole step: the engine gives the first piece its micro-batch of
        # `inputs`, and ignores them on the other ranks. The target is unused (the loss finds the
        # labels by position) but the engine wants one per micro-batch.
        inputs = torch.cat([micro.input_ids for micro in micro_batches])
        target = torch.zeros(count, device=inputs.device)
        self.schedule.step(inputs, target=target)
        if any(piece.forwards != count for piece in self.pieces):
            raise RuntimeError(
                f"pipeline schedule {self.name}: a piece ran another number of forwards than {count}"
            )
        return sum((loss.item() for loss in self.data.losses), 0.0)  # in order, as one process sums them


def _output_dtype(part: nn.Module) -> torch.dtype:
    """The dtype of a piece's output hidden states (the last piece's final norm may differ from
    the residual stream's), from a two-token forward without gradients."""
    parameter = next(part.parameters())
    embedding = getattr(part, "embedding", None)
    if embedding is not None:
        sample = torch.zeros(1, 2, dtype=torch.int64, device=parameter.device)
    else:
        sample = torch.zeros(1, 2, part.config.hidden_size, dtype=parameter.dtype, device=parameter.device)
    cu_seqlens = torch.tensor([0, 2], dtype=torch.int32, device=parameter.device)
    positions = torch.arange(2, device=parameter.device).unsqueeze(0)
    with torch.no_grad():
        return part(sample, positions, cu_seqlens, 2, apply_head=False).dtype
