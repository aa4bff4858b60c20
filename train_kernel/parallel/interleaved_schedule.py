"""The interleaved 1F1B schedule (model.num_chunks = C > 1 chunks per stage, Megatron's order).

The model is cut into P * C pieces; piece c * P + s is chunk c of stage s, so a micro-batch passes
stage 0..P-1 with chunk 0, wraps from the last stage back to stage 0 for chunk 1, and so on. Each
rank runs M * C forwards and M * C backwards: a warm-up of forwards, one forward one backward in the
steady state, backwards to cool down. Forwards cycle through the chunks P micro-batches at a time
(chunk 0 of micro-batches 0..P-1, chunk 1 of the same, ...), backwards through the chunks in reverse.

Communication: every output is sent with a non-blocking isend as soon as it exists (waited at the end
of the step), and every input is received right before the computation that needs it. A tag per
(direction, receiving chunk) keeps the streams between two ranks apart (with P = 2 both directions
carry activations). Sends never block a rank, so the schedule only needs each rank's order to be
consistent with the data dependencies, which Megatron's order is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from train_kernel.config.rules import check_interleaved  # the config's rule, kept for each step's count
from train_kernel.data.batches import MicroBatch
from train_kernel.parallel.stage import StageLoss


@dataclass(frozen=True, kw_only=True)
class ChunkRing:
    """This rank's place on the chain of pieces, and the global ranks of its pipeline group."""

    stage: int
    pipeline_ranks: list[int]
    num_chunks: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def num_stages(self) -> int:
        return len(self.pipeline_ranks)

    def is_first_piece(self, chunk: int) -> bool:
        return self.stage == 0 and chunk == 0

    def is_last_piece(self, chunk: int) -> bool:
        return self.stage == self.num_stages - 1 and chunk == self.num_chunks - 1

    def prev_piece(self, chunk: int) -> tuple[int, int]:
        """(global rank, chunk) of the piece whose output is this chunk's input."""
        if self.stage > 0:
            return self.pipeline_ranks[self.stage - 1], chunk
        return self.pipeline_ranks[-1], chunk - 1

    def next_piece(self, chunk: int) -> tuple[int, int]:
        if self.stage < self.num_stages - 1:
            return self.pipeline_ranks[self.stage + 1], chunk
        return self.pipeline_ranks[0], chunk + 1

    def buffer(self, micro: MicroBatch) -> torch.Tensor:
        return torch.empty((*micro.input_ids.shape, self.hidden_size), dtype=self.dtype, device=self.device)


def _forward_tag(chunk: int) -> int:
    return 2 * chunk


def _backward_tag(chunk: int) -> int:
    return 2 * chunk + 1


class _Sends:
    """Sends in flight: kept (with their tensors) until the step waits for them."""

    def __init__(self) -> None:
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, rank: int, tag: int) -> None:
        tensor = tensor.detach().contiguous()
        self.pending.append((dist.isend(tensor, rank, tag=tag), tensor))

    def wait_all(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def _recv(buffer: torch.Tensor, rank: int, tag: int) -> torch.Tensor:
    dist.irecv(buffer, rank, tag=tag).wait()
    return buffer


def schedule_order(stage: int, num_stages: int, num_chunks: int, micro_num: int) -> list[tuple[str, int]]:
    """This rank's actions in order: ("F" | "B", chunk). Within a chunk, forwards and backwards
    each take the micro-batches in order."""
    total = micro_num * num_chunks
    group = num_stages * num_chunks

    def chunk_of(k: int, forward: bool) -> int:
        chunk = (k % group) // num_stages
        return chunk if forward else num_chunks - 1 - chunk

    if micro_num == num_stages:
        warmup = total
    else:
        warmup = min((num_stages - stage - 1) * 2 + (num_chunks - 1) * num_stages, total)
    order = [("F", chunk_of(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", chunk_of(k + warmup, True)), ("B", chunk_of(k, False))]
    order += [("B", chunk_of(k, False)) for k in range(total - warmup, total)]
    return order


def interleaved_forward_backward(
    chunks: list[nn.Module],
    micro_batches: list[MicroBatch],
    *,
    loss_scale: float,
    loss_fn: StageLoss,
    ring: ChunkRing,
) -> float:
    """One step's forwards and backwards of this stage's chunks; returns the sum of the micro-batch
    losses on the last stage, 0.0 elsewhere."""
    count = len(micro_batches)
    check_interleaved(ring.num_stages, ring.num_chunks, count)
    sends = _Sends()
    forwards = [0] * ring.num_chunks
    backwards = [0] * ring.num_chunks
    in_flight: list[deque[tuple[torch.Tensor | None, torch.Tensor]]] = [deque() for _ in chunks]
    losses: list[float] = []
    for kind, chunk in schedule_order(ring.stage, ring.num_stages, ring.num_chunks, count):
        model = chunks[chunk]
        if kind == "F":
            micro = micro_batches[forwards[chunk]]
            forwards[chunk] += 1
            inputs = None
            if ring.is_first_piece(chunk):
                first_arg = micro.input_ids
            else:
                rank, _ = ring.prev_piece(chunk)
                # NOTE: this chunk's input is the previous piece's output for the micro-batch.
                inputs = _recv(ring.buffer(micro), rank, _forward_tag(chunk)).requires_grad_(True)
                first_arg = inputs
            out = model(first_arg, micro.position_ids, micro.cu_seqlens, micro.max_seqlen, apply_head=False)
            if ring.is_last_piece(chunk):
                out = loss_fn(model, out, micro)
                losses.append(out.item())
            else:
                rank, next_chunk = ring.next_piece(chunk)
                # NOTE: the next piece's forward input; sent at once, waited at the end of the step.
                sends.send(out, rank, _forward_tag(next_chunk))
            in_flight[chunk].append((inputs, out))
        else:
            micro = micro_batches[backwards[chunk]]
            backwards[chunk] += 1
            inputs, out = in_flight[chunk].popleft()
            if ring.is_last_piece(chunk):
                (out * loss_scale).backward()
            else:
                rank, _ = ring.next_piece(chunk)
                # NOTE: the gradient w.r.t. this chunk's output, from the next piece's backward.
                grad = _recv(ring.buffer(micro), rank, _backward_tag(chunk))
                torch.autograd.backward(out, grad_tensors=grad)
            if inputs is not None:
                rank, prev_chunk = ring.prev_piece(chunk)
                # NOTE: the previous piece's backward needs the gradient w.r.t. its output.
                sends.send(inputs.grad, rank, _backward_tag(prev_chunk))
    sends.wait_all()
    return sum(losses, 0.0)


@torch.no_grad()
def interleaved_forward_only(
    chunks: list[nn.Module], micro: MicroBatch, ring: ChunkRing
) -> torch.Tensor | None:
    """Validation forward of one micro-batch through this stage's chunks: the logits on the last
    stage, None elsewhere."""
    sends = _Sends()
    logits = None
    for chunk, model in enumerate(chunks):
        if ring.is_first_piece(chunk):
            first_arg = micro.input_ids
        else:
            rank, _ = ring.prev_piece(chunk)
            # NOTE: this chunk's input is the previous piece's output.
            first_arg = _recv(ring.buffer(micro), rank, _forward_tag(chunk))
        out = model(first_arg, micro.position_ids, micro.cu_seqlens, micro.max_seqlen)
        if ring.is_last_piece(chunk):
            logits = out
        else:
            rank, next_chunk = ring.next_piece(chunk)
            # NOTE: the next piece's input.
            sends.send(out, rank, _forward_tag(next_chunk))
    sends.wait_all()
    return logits
