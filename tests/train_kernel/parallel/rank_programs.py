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
        list(model.parameters()),
        AdamSettings(lr=0.1),
        scaler,
        1.0,
        data_group=parallel.data_group if with_data_group else None,
        data_size=2,
        zero_group=parallel.zero_group,
        zero_ranks=parallel.zero_ranks,
        zero_rank=parallel.zero_rank,
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
        "skipped_updated": skipped.updated,
        "scale_after_skip": scale_after_skip,
        "unchanged": unchanged,
        "second_updated": updated.updated,
        "weights": flat.tolist(),
    }


def rank_1_dies() -> dict:
    """Rank 1 fails after the groups exist; rank 0 is already in a collective with it."""
    parallel = init_parallel(ParallelConfig(zero1=1))
    if parallel.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.all_reduce(torch.ones(1), group=parallel.data_group)
    return {"returned": True}


def overlapped_grad_reduce() -> dict:
    """Two data-parallel ranks, two micro-batches: the overlapped reducer communicates during the
    last backward only, and its averaged gradients equal average_gradients' exactly."""
    from train_kernel.parallel.collectives import average_gradients

    parallel = init_parallel(ParallelConfig(zero1=1))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
    )
    optimizer = ZeroOptimizer(
        list(model.parameters()),
        AdamSettings(lr=0.1),
        DynamicLossScaler(enabled=False),
        0.0,
        data_group=parallel.data_group,
        data_size=2,
        overlap_grad_reduce=True,
        reduce_bucket_size=200,
    )
    reducer = optimizer.grad_reducer
    torch.manual_seed(1 + parallel.rank)
    inputs = [torch.randn(3, 8) for _ in range(2)]
    model(inputs[0]).square().sum().backward()
    pending_after_first = len(reducer._pending)
    optimizer.before_last_backward()
    model(inputs[1]).square().sum().backward()
    started = reducer.started_during_backward
    local = [p.grad.clone() for p in model.parameters()]
    reducer.finish()
    overlapped = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), local):
        p.grad = g.clone()
    average_gradients(list(model.parameters()), parallel.data_group, 2)
    equal = all(torch.equal(a, p.grad) for a, p in zip(overlapped, model.parameters()))
    # A step that never arms (e.g. the interleaved schedule) still reduces, after backward.
    for p, g in zip(model.parameters(), local):
        p.grad = g.clone()
    reducer.finish()
    equal_unarmed = all(torch.equal(a, p.grad) for a, p in zip(overlapped, model.parameters()))
    parallel.close(barrier=True)
    return {
        "buckets": len(reducer.buckets),
        "pending_after_first": pending_after_first,
        "started": started,
        "equal": equal,
        "equal_unarmed": equal_unarmed,
    }


def zero_state_round_trip() -> dict:
    """Each ZeRO rank exports its optimizer state after 2 steps (the checkpoint payload); a fresh
    optimizer (fresh model weights) imports it and takes the 3rd step. The weights must equal an
    uninterrupted 3-step run's."""
    parallel = init_parallel(ParallelConfig(zero1=2))

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        optimizer = ZeroOptimizer(
            list(model.parameters()),
            AdamSettings(lr=0.05),
            DynamicLossScaler(enabled=False),
            1.0,
            data_group=parallel.data_group,
            data_size=2,
            zero_group=parallel.zero_group,
            zero_ranks=parallel.zero_ranks,
            zero_rank=parallel.zero_rank,
        )
        return model, optimizer

    def step(model, optimizer, k: int) -> None:
        for i, p in enumerate(model.parameters()):
            p.grad = torch.full_like(p, 0.1 * (k + 1) * (i + 1) * (parallel.rank + 1))
        optimizer.step(lr=0.05, beta2=0.95)

    model, optimizer = build(0)
    for k in range(3):
        step(model, optimizer, k)
    uninterrupted = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    model, optimizer = build(0)
    for k in range(2):
        step(model, optimizer, k)
    state = optimizer.export_state()
    resumed_model, resumed = build(123)  # other initial weights: everything must come from the state
    resumed.import_state([state])
    step(resumed_model, resumed, 2)
    restored = torch.cat([p.detach().reshape(-1) for p in resumed_model.parameters()])
    parallel.close(barrier=True)
    return {
        "partition": state["partition"],
        "equal": torch.equal(uninterrupted, restored),
        "max_diff": (uninterrupted - restored).abs().max().item(),
    }


def overlapped_param_sync() -> dict:
    """ZeRO over 2 ranks, a 4-layer stack: after a step the broadcasts are still in flight; the
    forward waits for them layer by layer and ends with the same weights on both ranks as the
    synchronous broadcast gives."""
    parallel = init_parallel(ParallelConfig(zero1=2))

    def build(overlap: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
        optimizer = ZeroOptimizer(
            list(model.parameters()),
            AdamSettings(lr=0.1),
            DynamicLossScaler(enabled=False),
            1.0,
            zero_group=parallel.zero_group,
            zero_ranks=parallel.zero_ranks,
            zero_rank=parallel.zero_rank,
        )
        if overlap:
            optimizer.overlap_param_sync([model])
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5 + parallel.rank)  # both ranks step their own slice
        optimizer.step(lr=0.1, beta2=0.95)
        return model, optimizer

    model, optimizer = build(True)
    in_flight = optimizer.param_sync.busy
    out = model(torch.ones(2, 16))
    waited_in_forward = optimizer.param_sync.waited_in_forward
    reference_model, _ = build(False)
    expected = reference_model(torch.ones(2, 16))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    parallel.close(barrier=True)
    return {
        "in_flight_after_step": in_flight,
        "waited_in_forward": waited_in_forward,
        "same_output": torch.equal(out, expected),
        "ranks_agree": torch.equal(gathered[0], gathered[1]),
    }


PROGRAMS = {
    "overlapped_param_sync": overlapped_param_sync,
    "overflow": lambda: overflow_on_rank_0_only(False),
    "overflow_dp": lambda: overflow_on_rank_0_only(True),
    "rank_1_dies": rank_1_dies,
    "overlapped_grad_reduce": overlapped_grad_reduce,
    "zero_state_round_trip": zero_state_round_trip,
}

if __name__ == "__main__":
    print("RESULT " + json.dumps(PROGRAMS[sys.argv[1]]()), flush=True)
