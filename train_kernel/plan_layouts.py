"""`train-kernel plan --gpus N --gpu-memory-gib G`: the layouts (tensor x pipeline x data, ZeRO-1,
activation checkpointing) of a config that fit N GPUs of G GiB, best first.

A layout fits when the plan's per-rank memory (plan.MemoryEstimate, the largest stage) stays under
the GPU memory less a headroom for what the estimate leaves out (CUDA context, fragmentation). The
order is by an estimated step time per token, a rough model with stated assumptions:
    compute   = FLOPs per step / (N x GPU FLOP/s)        (checkpointing recomputes the forward)
    bubble    = compute x (pipeline - 1) / (micro_num x num_chunks)         (1F1B's idle share)
    comm      = tensor bytes / intra-node bandwidth + (data + ZeRO + pipeline bytes) / inter-node
                bandwidth, nothing overlapped (plan.Communication, the busiest rank)
Tensor parallelism stays within a node (tensor <= gpus_per_node); sequence parallelism is on with
tensor > 1 (the same bytes, activations / tensor). The config's micro_num is kept, so the global
batch grows with the data-parallel size; the rate per token compares the layouts fairly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from train_kernel.config import ConfigError, TrainConfig
from train_kernel.config.typecheck import replace_checked
from train_kernel.flops import flops_per_step
from train_kernel.parallel.tensor_rules import check_tensor_parallel
from train_kernel.plan import Plan, make_plan


@dataclass(frozen=True)
class Assumptions:
    gpu_tflops: float = 400.0  # achieved bf16 dense TFLOPS per GPU (an H100 at ~40% of its peak)
    intra_node_gbps: float = 200.0  # GB/s per GPU for the tensor group (NVLink)
    inter_node_gbps: float = 25.0  # GB/s per GPU across nodes (200 Gb/s InfiniBand)
    gpus_per_node: int = 8
    headroom: float = 0.1  # share of the GPU memory kept free of the estimate


@dataclass(frozen=True)
class Proposal:
    tensor: int
    pipeline: int
    data: int
    zero1: int
    checkpoint: bool
    plan: Plan
    step_s: float
    tokens_per_s_per_gpu: float

    def describe(self) -> str:
        memory = self.plan.memory.total / 2**30
        return (
            f"tensor {self.tensor} x pipeline {self.pipeline} x data {self.data}, zero1={self.zero1}, "
            f"checkpoint={self.checkpoint}, sequence_parallel={self.tensor > 1}: {memory:.1f} GiB/rank, "
            f"~{self.step_s:.2f} s/step, ~{self.tokens_per_s_per_gpu:,.0f} tokens/s/GPU"
        )

    def to_json(self) -> dict:
        return {
            "tensor": self.tensor,
            "pipeline": self.pipeline,
            "data": self.data,
            "zero1": self.zero1,
            "checkpoint": self.checkpoint,
            "sequence_parallel": self.tensor > 1,
            "memory_per_rank_bytes": self.plan.memory.total,
            "communication_per_rank_bytes": self.plan.communication.to_json(),
            "step_s": self.step_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _variant(config: TrainConfig, tensor: int, pipeline: int, zero1: int, checkpoint: bool) -> TrainConfig:
    parallel = config.parallel
    new_parallel = dataclasses.replace(
        parallel,
        zero1=zero1,
        tensor=dataclasses.replace(parallel.tensor, size=tensor),
        pipeline=dataclasses.replace(parallel.pipeline, size=pipeline),
        sequence_parallel=tensor > 1,
    )
    model = dataclasses.replace(config.model, checkpoint=checkpoint)
    check_tensor_parallel(model, new_parallel, config.data.seq_len)
    return replace_checked(config, parallel=new_parallel, model=model)


def step_seconds(plan: Plan, assumptions: Assumptions) -> float:
    layout, config = plan.layout, plan.config
    compute = flops_per_step(config, layout.data) / (layout.world_size * assumptions.gpu_tflops * 1e12)
    bubble = compute * (layout.pipeline - 1) / (config.data.micro_num * config.model.num_chunks)
    c = plan.communication
    comm = c.tensor / (assumptions.intra_node_gbps * 1e9) + (c.data + c.zero + c.pipeline) / (
        assumptions.inter_node_gbps * 1e9
    )
    return compute + bubble + comm


def propose_layouts(
    config: TrainConfig, gpus: int, gpu_bytes: int, assumptions: Assumptions | None = None
) -> list[Proposal]:
    """The layouts of `config` on `gpus` GPUs of `gpu_bytes` that fit, best (most tokens per
    second per GPU) first; empty when none fits."""
    assumptions = assumptions or Assumptions()
    limit = gpu_bytes * (1 - assumptions.headroom)
    proposals = []
    for tensor in _divisors(gpus):
        if tensor > assumptions.gpus_per_node:
            continue
        for pipeline in _divisors(gpus // tensor):
            data = gpus // (tensor * pipeline)
            for zero1 in sorted({1, data}):
                for checkpoint in (False, True):
                    try:
                        variant = _variant(config, tensor, pipeline, zero1, checkpoint)
                        plan = make_plan(variant, gpus)
                    except ConfigError:  # heads / layers / sizes this split cannot cut
                        continue
                    if plan.memory.total > limit:
                        continue
                    step = step_seconds(plan, assumptions)
                    proposals.append(
                        Proposal(
                            tensor,
                            pipeline,
                            data,
                            zero1,
                            checkpoint,
                            plan,
                            step,
                            plan.tokens_per_step / step / gpus,
                        )
                    )
    return sorted(proposals, key=lambda p: -p.tokens_per_s_per_gpu)


def render_proposals(proposals: list[Proposal], gpus: int, gpu_bytes: int, limit: int = 10) -> str:
    head = f"layouts on {gpus} GPUs of {gpu_bytes / 2**30:.0f} GiB, best first (plan_layouts.py's model):"
    if not proposals:
        return head + "\n  none fits: more GPUs, a smaller micro_bsz / seq_len, or a smaller model"
    lines = [f"  {n + 1}. {p.describe()}" for n, p in enumerate(proposals[:limit])]
    if len(proposals) > limit:
        lines.append(f"  ... {len(proposals) - limit} more that fit")
    return "\n".join([head, *lines])
