"""The 1F1B pipeline schedule (non-interleaved, as InternLM/Megatron run it) for one stage.

Stage s of P with M micro-batches:
- warm-up: min(P - s - 1, M) forwards, each activation sent on to the next stage;
- steady state: the remaining forwards, each followed by one backward (one forward, one backward),
  so at most P - s micro-batches keep their activations at once;
- cool-down: the backwards of the warm-up micro-batches.
Hidden states [B, L, hidden] travel forward to the next stage and their gradients back, with
point-to-point sends between the same data-parallel rank of adjacent stages. The last stage turns
its output into each micro-batch's loss with the caller's `StageLoss` (what the loss is, and the
metrics it feeds, are the trainer's: this module only moves tensors between stages).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from train_kernel.data.batches import MicroBatch
from train_kernel.parallel.stage import StageLoss


@dataclass(frozen=True, kw_only=True)
class StageLinks:
    """This stage's place in the pipeline, where its activations come from and go to (global ranks;
    None at the ends) and how the hidden states it exchanges look."""

    stage: int
    num_stages: int
    prev_rank: int | None
    next_rank: int | None
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.prev_rank is None

    @property
    def is_last(self) -> bool:
        return self.next_rank is None

    def _buffer(self, micro: MicroBatch) -> torch.Tensor:
        shape = (*micro.input_ids.shape, self.hidden_size)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def exchange(
        self,
        micro_for_recv: MicroBatch | None = None,
        *,
        send_next: torch.Tensor | None = None,
        recv_next: bool = False,
        send_prev: torch.Tensor | None = None,
        recv_prev: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Posts the requested sends and receives together and waits for all of them; returns
        (tensor received from the previous stage, gradient received from the next stage).
        Posting both directions at once is what keeps neighbours in the steady state (each
        sending to the other) from waiting on each other."""
        ops: list[dist.P2POp] = []
        from_prev = from_next = None
        if send_next is not None:
            # NOTE: the next stage's forward takes these hidden states as its input.
            ops.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), self.next_rank))
        if recv_prev:
            from_prev = self._buffer(micro_for_recv)
            # NOTE: this stage's forward input: the previous stage's output for the micro-batch.
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank))
        if send_prev is not None:
            # NOTE: the previous stage's backward needs the gradient of the loss w.r.t. its output.
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev_rank))
        if recv_next:
            from_next = self._buffer(micro_for_recv)
            # NOTE: the gradient w.r.t. this stage's output, computed by the next stage's backward.
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return from_prev, from_next


def _stage_forward(
    model: nn.Module,
    micro: MicroBatch,
    received: torch.Tensor | None,
    links: StageLinks,
    loss_fn: Callable[[torch.Tensor, MicroBatch], torch.Tensor],
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(input that needs a gradient or None on the first stage, output: hidden states, or on the
    last stage the micro-batch's loss from `loss_fn`)."""
    if links.is_first:
        inputs, first_arg = None, micro.input_ids
    else:
        inputs = received.requires_grad_(True)
        first_arg = inputs
    hidden = model(first_arg, micro.position_ids, micro.cu_seqlens, micro.max_seqlen, apply_head=False)
    return inputs, (loss_fn(hidden, micro) if links.is_last else hidden)


def _stage_backward(
    inputs: torch.Tensor | None, output: torch.Tensor, output_grad: torch.Tensor | None, loss_scale: float
) -> torch.Tensor | None:
    """Backward of one micro-batch through this stage; returns the gradient for the previous stage."""
    if output_grad is None:  # last stage: output is the loss
        (output * loss_scale).backward()
    else:
        torch.autograd.backward(output, grad_tensors=output_grad)
    return None if inputs is None else inputs.grad


def pipeline_forward_backward(
    model: nn.Module,
    micro_batches: list[MicroBatch],
    *,
    loss_scale: float,
    loss_fn: StageLoss,
    links: StageLinks,
    before_last_backward: Callable[[], None] | None = None,
) -> float:
    """One step's forwards and backwards on this stage (gradients accumulate in the parameters).
    Returns the sum of the micro-batch losses on the last stage, 0.0 on the others.
    `before_last_backward` runs right before this stage's last backward (the overlapped gradient
    reduction starts there)."""
    count = len(micro_batches)
    if count < 1:
        raise ValueError("the pipeline schedule needs at least one micro-batch")
    losses: list[torch.Tensor] = []

    def last_stage_loss(hidden: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        loss = loss_fn(model, hidden, micro)
        losses.append(loss.detach())
        return loss

    warmup = min(links.num_stages - links.stage - 1, count)
    in_flight: deque[tuple[torch.Tensor | None, torch.Tensor]] = deque()
    forward_at = backward_at = 0

    def forward() -> None:
        nonlocal forward_at
        micro = micro_batches[forward_at]
        received, _ = links.exchange(micro, recv_prev=not links.is_first)
        in_flight.append(_stage_forward(model, micro, received, links, last_stage_loss))
        forward_at += 1

    def backward(send_latest: bool) -> None:
        """Backward of the oldest micro-batch in flight. In the steady state the output of the
        forward just run goes to the next stage in the same exchange that brings this gradient."""
        nonlocal backward_at
        micro = micro_batches[backward_at]
        send = in_flight[-1][1] if send_latest and not links.is_last else None
        _, output_grad = links.exchange(micro, send_next=send, recv_next=not links.is_last)
        inputs, output = in_flight.popleft()
        if before_last_backward is not None and backward_at == count - 1:
            before_last_backward()
        input_grad = _stage_backward(inputs, output, output_grad, loss_scale)
        links.exchange(send_prev=input_grad if not links.is_first else None)
        backward_at += 1

    for _ in range(warmup):
        forward()
        if not links.is_last:
            links.exchange(send_next=in_flight[-1][1])
    for _ in range(count - warmup):
        forward()
        backward(send_latest=True)
    for _ in range(warmup):
        backward(send_latest=False)
    return sum((loss.item() for loss in losses), 0.0)  # in order, as one process sums them


@torch.no_grad()
def pipeline_forward_only(model: nn.Module, micro: MicroBatch, links: StageLinks) -> torch.Tensor | None:
    """Validation forward of one micro-batch through this stage: the logits on the last stage,
    None elsewhere."""
    received, _ = links.exchange(micro, recv_prev=not links.is_first)
    first_arg = micro.input_ids if links.is_first else received
    out = model(first_arg, micro.position_ids, micro.cu_seqlens, micro.max_seqlen)
    if not links.is_last:
        links.exchange(send_next=out)
        return None
    return out
