"""Data-parallel gradient all-reduce overlapped with backward (hybrid_zero_optimizer.overlap_sync_grad),
on 2 gloo ranks of this machine, with the trainer's own step pieces (forward_backward with
before_last_backward, ZeroOptimizer.step) on random tokens.

Model: hidden 512, 4 layers, seq 1024, bf16; per rank micro_num 2 x micro_bsz 1 (the same per-rank
batch in every case). Medians over the steps after a warm-up:
  a: step time with no communication (one rank alone, world size 1);
  b: the communication alone: the all-reduce of all the gradients (bf16, in buckets of
     reduce_bucket_size, as the reducer sends them, with its copy back), 2 ranks, timed in isolation;
  c: step time, data parallel 2, overlap on;
  d: step time, data parallel 2, overlap off.
c and d run in the same processes, alternating step by step (two ZeroOptimizers on one model), so a
load that comes and goes on the machine falls on both alike.
Also a_local: the same step without a data group, in the dp processes, alternating with c and d
(the no-communication step under exactly their CPU conditions).
Exposed communication: (c - a) / b (target <= 0.2) and (d - a) / b (about 1 without overlap).
Every rank runs with OMP_NUM_THREADS=1 (case a included), so a rank has one core's compute in every
case; on a 2-core machine the two ranks then take both cores, and gloo's communication threads compete
with the compute for them: the overlap cannot hide communication that has no core of its own to run on.
"""

from __future__ import annotations

import json
import os
import statistics

from bench.common import run_ranks, save_result

SHAPE = dict(
    hidden=512,
    layers=4,
    heads=8,
    seq_len=1024,
    vocab=int(os.environ.get("BENCH_OVERLAP_VOCAB", "16000")),
    micro_num=2,
)
BUCKET = int(os.environ.get("BENCH_OVERLAP_BUCKET", str(4 * 1024 * 1024)))
STEPS = int(os.environ.get("BENCH_OVERLAP_STEPS", "10"))
WARMUP = 2
TARGET = 0.2

# One rank's measurements: case "alone" (world size 1) or "dp" (b, then c and d alternating).
WORKER = r"""
import json, statistics, sys, time, torch, torch.distributed as dist
from train_kernel.data.batches import RandomRows, to_micro_batches
from train_kernel.model import ModelConfig, build_model
from train_kernel.optim.hybrid_adamw import AdamSettings
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.zero import ZeroOptimizer
from train_kernel.train.step import forward_backward
from train_kernel.train.token_metrics import TokenMetrics
shape, bucket, steps, warmup = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dist.init_process_group("gloo")
size = dist.get_world_size()
group = dist.group.WORLD if size > 1 else None
model = build_model(ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"],
                                num_attention_heads=shape["heads"], mlp_ratio=8 / 3,
                                vocab_size=shape["vocab"], dtype="torch.bfloat16", embed_grad_scale=1))
rows = RandomRows(4096, shape["seq_len"], 1, shape["vocab"], dist.get_rank())
micro = shape["micro_num"]
# "local": no data group, so no communication: the world-size-1 step, run beside the others.
optimizers = {mode: ZeroOptimizer(list(model.parameters()), AdamSettings(1e-4),
                                  DynamicLossScaler(enabled=False), 1.0,
                                  data_group=None if mode in ("alone", "local") else group, data_size=size,
                                  overlap_grad_reduce=(mode == "on"), reduce_bucket_size=bucket)
              for mode in (("on", "off", "local") if size > 1 else ("alone",))}
result = {}
if size > 1:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    reducer = optimizers["on"].grad_reducer
    times = []
    for _ in range(warmup + steps):
        dist.barrier()
        started = time.perf_counter()
        reducer.finish()  # not armed: every bucket's all-reduce, then the copy back
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    result["b"] = statistics.median(times[warmup:])
    result["buckets"] = len(reducer.buckets)
    result["elements"] = sum(p.numel() for p in params)
times = {mode: [] for mode in optimizers}
for step in range(warmup + steps):
    for mode, optimizer in optimizers.items():
        batch = to_micro_batches(rows.batch(range(step * micro % 4000, step * micro % 4000 + micro)),
                                 torch.device("cpu"))
        if group is not None:
            dist.barrier()
        started = time.perf_counter()
        forward_backward(model, batch, 1.0, 0.0, TokenMetrics(rows.type_names),
                         before_last_backward=optimizer.before_last_backward)
        optimizer.step(lr=1e-4, beta2=0.95)
        if step >= warmup:
            times[mode].append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
result["times"] = times
if dist.get_rank() == 0:
    print("RESULT " + json.dumps(result))
dist.destroy_process_group()
"""


def _measure(world_size: int, jobs: int = 1) -> dict:
    outputs = run_ranks(
        ["-c", WORKER, json.dumps(SHAPE), str(BUCKET), str(STEPS), str(WARMUP)], world_size, jobs=jobs
    )
    lines = [line for output in outputs for line in output.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[0][len("RESULT ") :])


def _spread(times: list[float]) -> float:
    """Median absolute deviation from the median: how much one run's step time wanders."""
    middle = statistics.median(times)
    return statistics.median(abs(t - middle) for t in times)


def main() -> None:
    # a: two world-size-1 jobs at once, one per rank (each rank alone, with the CPU it would have
    # beside the other rank, as in c and d).
    alone = _measure(1, jobs=2)
    dp = _measure(2)
    local = statistics.median(dp["times"]["local"])
    a_times, c_times, d_times = alone["times"]["alone"], dp["times"]["on"], dp["times"]["off"]
    b = dp["b"]
    comm = {"buckets": dp["buckets"], "elements": dp["elements"]}
    a, c, d = (statistics.median(t) for t in (a_times, c_times, d_times))
    noise = max(_spread(t) for t in (a_times, c_times, d_times))
    exposed_on, exposed_off = (c - a) / b, (d - a) / b
    cores = os.cpu_count() or 1
    result = {
        "shape": SHAPE,
        "reduce_bucket_size": BUCKET,
        "buckets": comm["buckets"],
        "gradient_elements": comm["elements"],
        "steps_measured": STEPS,
        "omp_threads_per_rank": 1,
        "a_step_alone_s": round(a, 4),
        "b_allreduce_alone_s": round(b, 4),
        "c_step_dp2_overlap_s": round(c, 4),
        "d_step_dp2_no_overlap_s": round(d, 4),
        "exposed_overlap": round(exposed_on, 3),
        "exposed_no_overlap": round(exposed_off, 3),
        "a_local_step_in_dp_processes_s": round(local, 4),
        "exposed_overlap_vs_local": round((c - local) / b, 3),
        "exposed_no_overlap_vs_local": round((d - local) / b, 3),
        "target_exposed_overlap": TARGET,
        # Met only where the measurement can resolve it: the step time's own wander below 0.2 b.
        "target_met": exposed_on <= TARGET and noise <= 0.2 * b,
        "step_time_spread_s": round(noise, 4),
        "spread_over_b": round(noise / b, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if exposed_on > TARGET or noise > 0.2 * b:
        result["note"] = (
            f"target not reached here: {cores} cores for 2 ranks that each compute on one thread, so gloo's "
            "all-reduce threads have no idle core to run on during backward and take time from the compute "
            "(and another workload may share the machine); the overlap can only hide communication that "
            "has its own resources (a NIC/DMA engine, a spare core)."
        )
    if noise > 0.2 * b:
        result["noise"] = (
            f"the step time wanders by {noise:.3f} s (median absolute deviation) against b = {b:.3f} s: "
            "the ratios are within the measurement noise here, not a measurement of the overlap"
        )
    save_result("overlap", result)


if __name__ == "__main__":
    main()
