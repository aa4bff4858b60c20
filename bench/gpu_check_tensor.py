"""The device checks of tensor parallelism (issue 16).

- two_ranks (needs 2 CUDA devices; on CPU it runs on gloo, as the dry run of this code): the
  trainer through `train-kernel run --launcher torch` as 2 ranks, tensor 2 and tensor 2 with
  sequence parallelism, against one process on the same global batch: every step's loss and grad
  norm within TWO_RANK_RTOL, and the step-time ratio (median of the steps after the warm-up).
  One GPU cannot hold it: NCCL refuses two ranks of one communicator on the same device ("Duplicate
  GPU detected : rank 1 and rank 0 both on CUDA device ..."), so with one GPU it is skipped.
- one_rank (any device; NCCL on CUDA, gloo on CPU): what one GPU can check of the tensor-parallel
  code. A one-rank process group, the model sharded for tensor rank 0 of 1 (apply_tensor_parallel:
  vocabulary-parallel embedding, head and fused loss, row-parallel linears, with and without sequence
  parallelism, whose reduce-scatter is reduce_scatter_tensor on NCCL), forward and backward
  on CUDA tensors, against the plain model: the loss and every parameter's gradient. With one rank
  the collectives are identities, so this shows that the code runs on CUDA with NCCL (devices,
  dtypes, NCCL's collectives), not that the shards are combined right: two_ranks and the gloo
  tests (tests/train_kernel/parallel/test_tensor_parallel.py) show that.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from bench.cli_runs import ChildRun, run_child, run_ranks, step_seconds, train_args, train_records
from bench.common import free_port
from bench.gpu_check_health import release_cached_memory

RUN_TIMEOUT_S = 150
ONE_RANK_TIMEOUT_S = 90
WARMUP_STEPS = 2
# fp32 throughout; on CUDA other GEMM shapes sum in other orders (and kernels may use atomics).
TWO_RANK_RTOL = {"cuda": 1e-3, "cpu": 1e-5}
NEEDS_TWO_GPUS = (
    "needs 2 CUDA devices: NCCL refuses two ranks on one device ('Duplicate GPU detected : rank 1 "
    "and rank 0 both on CUDA device ...'); the multi-rank schedules stay tested on gloo"
)
# The speed shape (CUDA) and the dry-run shape (CPU, --tiny).
SHAPES = {
    "cuda": dict(
        seq_len=4096, micro_num=2, layers=4, hidden=2048, heads=16, kv_heads=8, vocab=32000, steps=8
    ),
    "tiny": dict(seq_len=64, micro_num=2, layers=2, hidden=64, heads=4, kv_heads=2, vocab=300, steps=4),
}
VARIANTS = {
    "tensor2": "dict(zero1=1, tensor=2)",
    "tensor2_sequence_parallel": "dict(zero1=1, tensor=2, sequence_parallel=True)",
}
CONFIG = """
JOB_NAME = "gpu_check_tensor"
data = dict(seq_len={seq_len}, micro_num={micro_num}, micro_bsz=1, total_steps={steps})
adam = dict(lr=1e-4)
model = dict(num_layers={layers}, hidden_size={hidden}, num_attention_heads={heads},
             num_kv_attention_heads={kv_heads}, mlp_ratio=8 / 3, vocab_size={vocab},
             dtype="torch.float32", checkpoint=False)
parallel = {parallel}
run_dir = {run_dir!r}
"""


def tensor_parallel_check(dev: torch.device, work: Path, tiny: bool) -> dict:
    release_cached_memory(dev)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"one_rank": one_rank_check(dev, work)}
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and gpus < 2:
        result["two_ranks"] = {"skipped": f"{NEEDS_TWO_GPUS} (this machine: {gpus})"}
    else:
        shape = SHAPES["tiny" if tiny or dev.type != "cuda" else "cuda"]
        result["two_ranks"] = two_rank_check(dev, work / "two_ranks", shape)
    result["ok"] = all(part.get("ok", True) for part in result.values())
    return result


# --- two ranks through the CLI ------------------------------------------------------------------


def two_rank_check(dev: torch.device, work: Path, shape: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    rtol = TWO_RANK_RTOL[dev.type]
    single_dir = work / "single"
    config = _write_config(work / "single.py", shape, "dict(zero1=1)", single_dir)
    single = run_child(train_args(config, "--launcher", "local"), RUN_TIMEOUT_S, work / "single.log")
    result: dict = {"shape": shape, "rtol": rtol, "single": _run_report(single, single_dir, 1)}
    problems = _failed("single", [single])
    reference = train_records(single_dir)
    for name, parallel in VARIANTS.items():
        run_dir = work / name
        config = _write_config(work / f"{name}.py", shape, parallel, run_dir)
        # One thread per rank on CPU (the dry run shares the cores); GPUs take LOCAL_RANK's device.
        env = {"OMP_NUM_THREADS": "1"} if dev.type == "cpu" else None
        ranks = run_ranks(train_args(config, "--launcher", "torch"), 2, RUN_TIMEOUT_S, work / name, env)
        report = _run_report(ranks[0], run_dir, 2)
        problems += _failed(name, ranks)
        records = train_records(run_dir)
        if records and reference:
            report["max_rel_loss_diff"], mismatch = compare_records(reference, records, rtol)
            problems += [f"{name}: {line}" for line in mismatch]
            if report.get("median_step_s") and result["single"].get("median_step_s"):
                report["step_time_over_single"] = round(
                    report["median_step_s"] / result["single"]["median_step_s"], 3
                )
        result[name] = report
    result["ok"] = not problems
    if problems:
        result["problems"] = problems
    return result


def compare_records(reference: list[dict], records: list[dict], rtol: float) -> tuple[float, list[str]]:
    """Per step: the same steps and tokens, loss within rtol, grad norm within 10 x rtol (relative).
    The largest relative loss difference, and what did not match."""
    problems: list[str] = []
    if [r["step"] for r in records] != [r["step"] for r in reference]:
        problems.append(f"steps {[r['step'] for r in records]} against {[r['step'] for r in reference]}")
    worst = 0.0
    for one, other in zip(reference, records):
        diff = abs(other["loss"] - one["loss"]) / max(abs(one["loss"]), 1e-12)
        worst = max(worst, diff)
        if not diff <= rtol:  # a NaN loss fails too
            problems.append(f"step {one['step']}: loss {other['loss']} against {one['loss']}")
        norm, want = other["grad_norm"]["0_default"], one["grad_norm"]["0_default"]
        if not abs(norm - want) <= 10 * rtol * max(abs(want), 1e-12):
            problems.append(f"step {one['step']}: grad norm {norm} against {want}")
        if other["num_consumed_tokens"] != one["num_consumed_tokens"]:
            tokens = other["num_consumed_tokens"]
            problems.append(f"step {one['step']}: tokens consumed {tokens}, not {one['num_consumed_tokens']}")
    return worst, problems


def _write_config(path: Path, shape: dict, parallel: str, run_dir: Path) -> Path:
    path.write_text(CONFIG.format(parallel=parallel, run_dir=str(run_dir), **shape))
    return path


def _run_report(run: ChildRun, run_dir: Path, world: int) -> dict:
    records = train_records(run_dir)
    timed = step_seconds(records, world)[WARMUP_STEPS:]
    return {
        "returncode": run.returncode,
        "run_seconds": round(run.seconds, 1),
        "steps": len(records),
        "median_step_s": round(statistics.median(timed), 4) if timed else None,
        "losses": [r["loss"] for r in records],
    }


def _failed(name: str, runs: list[ChildRun]) -> list[str]:
    problems = []
    for rank, run in enumerate(runs):
        if run.timed_out:
            problems.append(f"{name} rank {rank}: killed at the time limit; log tail: {run.tail(600)}")
        elif run.returncode != 0:
            problems.append(f"{name} rank {rank}: exit code {run.returncode}; log tail: {run.tail(600)}")
    return problems


# --- one rank: the tensor-parallel modules on the device ------------------------------------------

ONE_RANK_PROGRAM = r"""
import json, sys
import torch, torch.distributed as dist
backend, port = sys.argv[1], sys.argv[2]
cuda = backend == "nccl"
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
from train_kernel.data.batches import RandomRows, to_micro_batches
from train_kernel.model import ModelConfig, build_model
from train_kernel.parallel.tensor_parallel import TensorGroup, apply_tensor_parallel
from train_kernel.train.step import forward_backward
from train_kernel.train.token_metrics import TokenMetrics

rows = RandomRows(16, 512, 1, 1024, 0)
report = {"backend": dist.get_backend(), "device": str(device)}
for dtype in ("torch.float32", "torch.bfloat16"):
    config = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8, num_kv_attention_heads=4,
                         mlp_ratio=8 / 3, vocab_size=1024, dtype=dtype, embed_grad_scale=1)
    batch = to_micro_batches(rows.batch(range(2)), device)
    runs = {}
    for name, sequence_parallel in (("plain", None), ("tensor1", False), ("tensor1_sequence_parallel", True)):
        model = build_model(config, device, seed=1)
        if sequence_parallel is not None:
            apply_tensor_parallel(model, config, TensorGroup(dist.group.WORLD, 0, 1, sequence_parallel))
        loss = forward_backward(model, batch, 1.0, 0.0, TokenMetrics(rows.type_names)).loss
        grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        runs[name] = (loss, grads)
    plain_loss, plain_grads = runs.pop("plain")
    for name, (loss, grads) in runs.items():
        diffs = [float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                 for n, g in plain_grads.items() if n in grads]
        worst = max(diffs, default=float("nan"))
        report[f"{dtype.split('.')[-1]}_{name}"] = {
            "loss": loss, "plain_loss": plain_loss,
            "rel_loss_diff": abs(loss - plain_loss) / abs(plain_loss),
            "max_rel_grad_diff": worst,
            "gradients": len(grads), "plain_gradients": len(plain_grads),
            "same_parameter_names": sorted(grads) == sorted(plain_grads),
        }
if cuda:
    report["nccl_version"] = str(torch.cuda.nccl.version())
print("RESULT " + json.dumps(report), flush=True)
dist.destroy_process_group()
"""
# Largest relative differences the one-rank shard may show against the plain model, by dtype.
ONE_RANK_RTOL = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 1e-2, "grad": 5e-2}}


def one_rank_check(dev: torch.device, work: Path) -> dict:
    backend = "nccl" if dev.type == "cuda" else "gloo"
    log = work / "tensor_one_rank.log"
    run = run_child(["-c", ONE_RANK_PROGRAM, backend, str(free_port())], ONE_RANK_TIMEOUT_S, log)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        state = "killed at the time limit" if run.timed_out else f"exit code {run.returncode}"
        return {"ok": False, "problems": [f"the program failed: {state}"], "log_tail": run.tail()}
    report = json.loads(lines[-1][len("RESULT ") :])
    problems = one_rank_problems(report)
    report["ok"] = not problems
    if problems:
        report["problems"] = problems
    return report


def one_rank_problems(report: dict) -> list[str]:
    problems = []
    for dtype, limits in ONE_RANK_RTOL.items():
        for name in ("tensor1", "tensor1_sequence_parallel"):
            case = report.get(f"{dtype}_{name}")
            if case is None:
                problems.append(f"{dtype} {name}: not run")
                continue
            if not case["same_parameter_names"] or case["gradients"] != case["plain_gradients"]:
                problems.append(f"{dtype} {name}: the sharded model's gradients are not the plain model's")
            if not case["rel_loss_diff"] <= limits["loss"]:
                problems.append(f"{dtype} {name}: loss {case['loss']} against {case['plain_loss']}")
            if not case["max_rel_grad_diff"] <= limits["grad"]:
                worst = case["max_rel_grad_diff"]
                problems.append(f"{dtype} {name}: gradients differ by {worst:.3g} (relative to the largest)")
    return problems
