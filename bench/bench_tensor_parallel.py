"""Tensor parallelism on this CPU: communication volume per step measured against plan.py's formula,
and the step time of tensor 2 against one process.

Each rank runs the trainer's forward_backward (fused vocabulary-parallel loss included) on random
packed rows of a small model (SHAPE, fp32) for micro_num micro-batches a step; every
torch.distributed collective is counted while it runs (bytes of its tensors, and the bytes a ring
algorithm sends per rank: all-reduce 2 (n-1)/n S, all-gather (n-1)/n S of the gathered tensor,
reduce-scatter (n-1)/n S of its input).
Cases:
  one_process_1_thread / one_process_2_threads: the same step without tensor parallelism;
  tensor2: 2 gloo processes, 1 thread each (the machine's 2 cores);
  tensor2_sequence_parallel: the same with parallel.sequence_parallel.
Measured bytes per step are compared with plan.tensor_bytes_per_micro_batch x micro_num (what
`train-kernel plan` reports); gloo runs the same collectives NCCL would (reduce_scatter_tensor
included). Results: bench/results/tensor_parallel_<date>.json.
Run: python -m bench.bench_tensor_parallel (about a minute on 2 cores; other load skews the times).
"""

from __future__ import annotations

import json
import os
import time

from bench.common import ROOT, result_line, run_ranks

SHAPE = dict(hidden=512, layers=4, heads=8, kv_heads=8, seq_len=1024, micro_bsz=1, vocab=16000, micro_num=2)
STEPS = int(os.environ.get("BENCH_TP_STEPS", "5"))
WARMUP = 1

WORKER = r"""
import json, statistics, sys, time, types
import torch, torch.distributed as dist
shape, steps, warmup, sp = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"

counts = {"calls": 0, "tensor_bytes": 0, "ring_bytes": 0}
def _count(name, original):
    def wrapper(*args, **kwargs):
        group = kwargs.get("group")
        n = dist.get_world_size(group)
        if name == "all_gather":
            size = sum(t.numel() * t.element_size() for t in args[0])
            ring = (n - 1) / n * size
        elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):  # (output, input): (n-1)/n of it
            size = args[1].numel() * args[1].element_size()
            ring = (n - 1) / n * size
        else:
            tensor = args[0]
            size = tensor.numel() * tensor.element_size()
            ring = 2 * (n - 1) / n * size if name == "all_reduce" else (n - 1) / n * size
        counts["calls"] += 1
        counts["tensor_bytes"] += size
        counts["ring_bytes"] += ring
        return original(*args, **kwargs)
    return wrapper
for name in ("all_reduce", "all_gather", "reduce_scatter_tensor", "reduce_scatter_single"):
    if hasattr(dist, name):  # reduce_scatter_single: torch 2.13's name of reduce_scatter_tensor
        setattr(dist, name, _count(name, getattr(dist, name)))

from train_kernel.config.sections import ParallelConfig, TensorConfig
from train_kernel.data.batches import RandomRows, to_micro_batches
from train_kernel.model import ModelConfig, build_model
from train_kernel.parallel.process_groups import init_parallel
from train_kernel.parallel.tensor_parallel import shard_model_part
from train_kernel.plan import tensor_bytes_per_micro_batch
from train_kernel.train.step import forward_backward
from train_kernel.train.token_metrics import TokenMetrics

world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
parallel = init_parallel(ParallelConfig(zero1=1, tensor=TensorConfig(size=world), sequence_parallel=sp))
config = ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"],
                     num_attention_heads=shape["heads"], num_kv_attention_heads=shape["kv_heads"],
                     mlp_ratio=8 / 3, vocab_size=shape["vocab"], dtype="torch.float32", embed_grad_scale=1)
model = shard_model_part(build_model(config, seed=1), config, parallel)
rows = RandomRows(4096, shape["seq_len"], shape["micro_bsz"], shape["vocab"], 0)
micro = shape["micro_num"]
times, per_step = [], []
for step in range(warmup + steps):
    batch = to_micro_batches(rows.batch(range(step * micro, step * micro + micro)), torch.device("cpu"))
    if world > 1:
        dist.barrier()
    before = dict(counts)
    started = time.perf_counter()
    forward_backward(model, batch, 1.0, 0.0, TokenMetrics(rows.type_names))
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    if step >= warmup:
        times.append(elapsed)
        delta = {k: counts[k] - before[k] for k in counts}
        per_step.append(delta)
result = {"step_s": statistics.median(times), "times": times, "comm": per_step[-1]}
if world > 1:
    tokens = shape["seq_len"] * shape["micro_bsz"]
    fake = types.SimpleNamespace(model=config, data=types.SimpleNamespace(packed_length=tokens),
                                 parallel=types.SimpleNamespace(sequence_parallel=sp))
    result["formula_bytes"] = micro * tensor_bytes_per_micro_batch(fake, parallel.layout, 0)
if parallel.rank == 0:
    print("RESULT " + json.dumps(result))
parallel.close(barrier=True)
"""


def _run(world: int, threads: int, sequence_parallel: bool = False) -> dict:
    args = ["-c", WORKER, json.dumps(SHAPE), str(STEPS), str(WARMUP), "1" if sequence_parallel else "0"]
    return result_line(run_ranks(args, world, threads=threads))


def main() -> None:
    one_1 = _run(1, 1)
    one_2 = _run(1, 2)
    tp = _run(2, 1)
    tp_sp = _run(2, 1, sequence_parallel=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "shape": SHAPE,
        "dtype": "float32",
        "steps_measured": STEPS,
        "step": "forward_backward of micro_num micro-batches (no optimizer step)",
        "one_process_1_thread_s": round(one_1["step_s"], 4),
        "one_process_2_threads_s": round(one_2["step_s"], 4),
        "tensor2_s": round(tp["step_s"], 4),
        "tensor2_sequence_parallel_s": round(tp_sp["step_s"], 4),
        "tensor2_over_one_process_2_threads": round(tp["step_s"] / one_2["step_s"], 3),
        "tensor2_over_one_process_1_thread": round(tp["step_s"] / one_1["step_s"], 3),
    }
    for name, case in (("tensor2", tp), ("tensor2_sequence_parallel", tp_sp)):
        comm, formula = case["comm"], case["formula_bytes"]
        result[f"{name}_collectives_per_step"] = comm["calls"]
        result[f"{name}_ring_bytes_per_step_measured"] = int(comm["ring_bytes"])
        result[f"{name}_ring_bytes_per_step_formula"] = int(formula)
        result[f"{name}_measured_over_formula"] = round(comm["ring_bytes"] / formula, 4)
    out = ROOT / "bench" / "results" / f"tensor_parallel_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
