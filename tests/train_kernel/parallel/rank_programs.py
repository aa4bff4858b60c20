"""Programs the two-rank tests start once per rank: `python -m tests.train_kernel.parallel.rank_programs
<name>`. Each prints one line `RESULT <json>` for the test to read."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from train_kernel.config.sections import ParallelConfig
from train_kernel.optim.hybrid_adamw import AdamSettings
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.zero import ZeroOptimizer
from train_kernel.parallel.process_groups import init_parallel


def overflow_on_rank_0_only(with_data_group: bool) -> dict:
    """ZeRO over 2 ranks; rank 0 alone sees an inf in its slice of the gradients."""
    parallel = init_parallel(ParallelConfig(zero1=2))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)  # 15 elements: rank 0 owns [0, 8) (weight), rank 1 [8, 15)
    scaler = DynamicLossScaler(initial_scale=1024, hysteresis=1, enabled=True)
    optimizer = ZeroOptimizer(
        list(model.parameters()), AdamSettings(lr=0.1), scaler, 1.0,
        data_group=parallel.data_group if with_data_group else None, data_size=2,
        zero_group=parallel.zero_group, zero_ranks=parallel.zero_ranks, zero_rank=parallel.zero_rank,
    )
    before = [p.detach().clone() for p in model.parameters()]
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.ones_like(model.bias)
    if parallel.rank == 0:
        model.weight.grad[0, 0] = float("inf")
    skipped = optimizer.step(lr=0.1, beta2=0.95)
    scale_after_skip = scaler.scale
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.ones_like(model.bias)
    updated = optimizer.step(lr=0.1, beta2=0.95)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    parallel.close(barrier=True)
    return {
        "skipped_updated": skipped.updated, "scale_after_skip": scale_after_skip,
        "unchanged": unchanged, "second_updated": updated.updated, "weights": flat.tolist(),
    }


def rank_1_dies() -> dict:
    """Rank 1 fails after the groups exist; rank 0 is already in a collective with it."""
    parallel = init_parallel(ParallelConfig(zero1=1))
    if parallel.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.all_reduce(torch.ones(1), group=parallel.data_group)
    return {"returned": True}


PROGRAMS = {
    "overflow": lambda: overflow_on_rank_0_only(False),
    "overflow_dp": lambda: overflow_on_rank_0_only(True),
    "rank_1_dies": rank_1_dies,
}

if __name__ == "__main__":
    print("RESULT " + json.dumps(PROGRAMS[sys.argv[1]]()), flush=True)
