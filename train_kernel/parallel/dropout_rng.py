"""Which random stream each dropout draws from, across the parallel ranks (the semantics of
Megatron's and InternLM's RNG trackers).

- Activations replicated over the tensor ranks (the block's dropout after the attention and the
  MLP without sequence parallelism: out_proj's and w3's outputs are all-reduced, the same tensor on
  every tensor rank) draw from the rank's global generator, which is the same on every rank of a
  tensor group: the same mask everywhere, so the replicas stay equal.
- Activations split over the tensor ranks (the attention probabilities of the rank's own heads;
  with sequence parallelism the block's dropout on the rank's token shard) draw from a stream
  forked per tensor rank: one value drawn from the global generator (the same draw on every tensor
  rank, so they stay in step) mixed with the tensor rank seeds the generators for that call, and
  the global state is put back afterwards. Without the fork every tensor rank would drop the same
  positions of its heads or tokens: masks correlated across the split.
- Data-parallel ranks and pipeline stages draw different streams: the global generator is seeded
  from (seed, data rank, pipeline stage); rank (0, 0) keeps the config's seed itself, so one
  process draws exactly what it drew before.

All the state lives in the global generators (CPU, and CUDA where the activations are): activation
checkpointing's recompute, which restores them, draws the same masks again, and a checkpoint's
rng_tp{t}_pp{p}_dp{d}.pt (checkpoint/rng.py) is all a resume needs to continue the same streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from train_kernel.parallel.process_groups import ParallelContext

_SEED_BITS = (1 << 63) - 1
_FORK_TAG = 0x7E25  # keeps the forked seeds apart from rank_seed's for the same numbers


def rank_seed(seed: int, data_rank: int, pipeline_rank: int) -> int:
    """The global generators' seed of a rank: the config's seed on data rank 0, stage 0 (one
    process unchanged), a mix of the three elsewhere. The tensor rank does not enter: the ranks of
    a tensor group must draw the same replicated masks."""
    if data_rank == 0 and pipeline_rank == 0:
        return seed
    return _mix(seed, data_rank, pipeline_rank)


def _mix(*numbers: int) -> int:
    state = np.random.SeedSequence([int(n) & _SEED_BITS for n in numbers]).generate_state(1, np.uint64)
    return int(state[0]) & _SEED_BITS


def seed_rank_generators(seed: int, parallel: ParallelContext) -> None:
    """Seeds torch's global generators for this rank. Only dropout draws from them: initialisation
    uses a generator per tensor and data order numpy's."""
    torch.manual_seed(rank_seed(seed, parallel.dp_rank, parallel.pp_rank))


def _accelerator_generator(device: torch.device) -> torch.Generator | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


ForkedState = tuple[torch.Tensor, torch.Generator | None, torch.Tensor | None]


def fork_for_tensor_rank(tensor_rank: int, device: torch.device) -> ForkedState:
    """Seeds the global generators (CPU, and `device`'s) for a tensor-split region of this rank;
    returns what restore_after_fork puts back. Draws one value from the global CPU generator."""
    draw = int(torch.randint(0, _SEED_BITS, (1,), dtype=torch.int64).item())
    seed = _mix(draw, tensor_rank, _FORK_TAG)
    cpu_state = torch.get_rng_state()
    generator = _accelerator_generator(device)
    accelerator_state = generator.get_state() if generator is not None else None
    torch.default_generator.manual_seed(seed)
    if generator is not None:
        generator.manual_seed(seed)
    return cpu_state, generator, accelerator_state


def restore_after_fork(saved: ForkedState) -> None:
    cpu_state, generator, accelerator_state = saved
    torch.set_rng_state(cpu_state)
    if generator is not None:
        generator.set_state(accelerator_state)


class TensorSplitDropout(nn.Dropout):
    """nn.Dropout on activations split over the tensor ranks (sequence-parallel token shards): the
    mask from this tensor rank's forked stream."""

    def __init__(self, p: float, tensor_rank: int) -> None:
        super().__init__(p)
        self.tensor_rank = tensor_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x  # no draw, as nn.Dropout: the ranks stay in step
        saved = fork_for_tensor_rank(self.tensor_rank, x.device)
        try:
            return super().forward(x)
        finally:
            restore_after_fork(saved)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tensor_rank={self.tensor_rank}"


def _attention_enter(tensor_rank: int) -> Callable[[nn.Module, Sequence], None]:
    def hook(module: nn.Module, args: Sequence) -> None:
        forked = module.training and module.dropout_p > 0
        module._dropout_forks.append(fork_for_tensor_rank(tensor_rank, args[0].device) if forked else None)

    return hook


def _attention_leave(module: nn.Module, args: Sequence, output: Any) -> None:
    saved = module._dropout_forks.pop()
    if saved is not None:
        restore_after_fork(saved)


def use_tensor_dropout_streams(
    layers: Sequence[nn.Module], tensor_rank: int, sequence_parallel: bool
) -> None:
    """Points the dropouts of the transformer blocks `layers` (this tensor rank's shard) at their
    streams: the attention's dropout (on the rank's heads) at the forked one; the block's dropout
    at the forked one with sequence parallelism (token shards), else left on the replicated global
    one. Works on the meta device (hooks and a parameterless module only)."""
    for layer in layers:
        attention = layer.attention
        if not hasattr(attention, "_dropout_forks"):
            attention._dropout_forks = []  # a stack: the leave hook pops what the enter hook forked
            attention.register_forward_pre_hook(_attention_enter(tensor_rank))
            # always_call: the global state is put back even when the forward raises.
            attention.register_forward_hook(_attention_leave, always_call=True)
        if sequence_parallel and not isinstance(layer.dropout, TensorSplitDropout):
            layer.dropout = TensorSplitDropout(layer.dropout.p, tensor_rank)
