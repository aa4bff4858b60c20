"""The prepared device check (run it when a GPU machine is lent; it also runs on CPU with --tiny).

    python -m bench.gpu_check [--tiny] [--out DIR] [--hidden 4096 --layers 32 --heads 32 --steps 6]

1. attention: the packed attention kernel the model takes on the device (flash-attn's varlen kernel
   when importable, else PyTorch's own varlen flash kernel) and the bucketed SDPA fallback, each
   against a per-document reference in value and gradient, bf16, and their forward+backward times;
2. fp16: a short run with InternLM's dynamic loss scaler, counting skipped steps;
3. nccl: a one-rank NCCL group running the collectives the parallel trainer uses (one GPU cannot
   hold two NCCL ranks; the multi-rank schedules are tested on gloo);
4. checkpoints: a bf16 run saving asynchronously through the private uploader (device tensors to
   the spool), resumed from its step-10 checkpoint: the resumed losses against the uninterrupted run;
5. MFU: `train-kernel`'s trainer on random tokens for the largest InternLM model of the given width
   that `train-kernel plan` says fits the device (default: the seed's 7B shape, activation
   checkpointing on, layers cut until it fits), tflops from InternLM's formula over the device's bf16
   matmul rate measured in the same run.
6. dtype_auto: what model.dtype="auto" takes on the device;
7. profiling (bench/gpu_check_health.py, issue 17): `train-kernel run --profiling`: CUDA kernels in
   the trace, CUDA figures in the per-step memory file;
8. oom (same module): a run capped below its needs ends with torch.OutOfMemoryError naming the
   memory snapshot, which loads and holds the "oom" event;
9. tensor_parallel (bench/gpu_check_tensor.py, issue 16): tensor-parallel modules on CUDA with a
   one-rank NCCL group against the plain model; with 2+ GPUs, tensor 2 on NCCL against one process
   (losses, step-time ratio); with one GPU that part says why it is skipped.
Each section is isolated: one that fails records its error and the others still run; sections
7-9 also report "ok" and, if not, "problems". Every child process has a time limit: sections 7-9
take an estimated minute on one GPU (not measured yet), at most 4.5 minutes if every child hung
(with 2+ GPUs the two-rank runs add up to 3 x 2.5 minutes). The result is rewritten after
every section to bench/out/gpu_check.json (and DIR/gpu_check.json with --out), so a run cut short
still leaves what it measured. On CPU, `--tiny --only profiling,oom,tensor_parallel` is the dry
run of sections 7-9 (tests/bench/test_gpu_check.py runs it): the profiling run on CPU, oom
skipped, tensor parallelism on gloo (2 ranks included).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import OUT, ROOT

CONFIG = """
JOB_NAME = "gpu_check"
data = dict(seq_len={seq_len}, micro_num={micro_num}, micro_bsz=1, total_steps={steps})
adam = dict(lr=1e-4)
grad_scaler = dict(fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000), hysteresis=2)
model = dict(num_layers={layers}, hidden_size={hidden}, num_attention_heads={heads}, mlp_ratio=8 / 3,
             vocab_size={vocab}, dtype="{dtype}", checkpoint={checkpoint}, use_flash_attn=True)
parallel = dict(zero1=1)
run_dir = {run_dir!r}
"""
GIB = 2**30
# Room left beside the plan's estimate: the CUDA context, allocator fragmentation, the loss's
# chunk buffers and single kernels' temporaries, which the plan does not count.
MEMORY_MARGIN_BYTES = 8 * GIB


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def attention_check(dev: torch.device, heads: int = 8, dim: int = 128) -> dict:
    from train_kernel.model.attention import PackedSegments, attention_kernel, varlen_causal_attention
    from train_kernel.model.layers import apex_rms_norm_applies

    torch.manual_seed(0)
    lengths = [700, 300, 1048, 2048]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(sum(lengths), heads, dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn_like(q)
    result: dict = {"kernel": attention_kernel(q), "apex_rms_norm_used": apex_rms_norm_applies(q)}
    # The reference: each document on its own through SDPA in fp32, value and input gradients.
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                *(x[start:end].transpose(0, 1) for x in ref_in), is_causal=True
            ).transpose(0, 1)
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist())
        ]
    )
    ref_out.backward(grad_out.float())
    for name, use_flash in (("flash", True), ("sdpa_buckets", False)):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        segments = PackedSegments(cu, max(lengths))
        out = varlen_causal_attention(*inputs, segments, 0.0, use_flash)
        out.backward(grad_out)
        result[name] = {
            "kernel": attention_kernel(q, use_flash),
            "max_abs_diff_out": (out.float() - ref_out).abs().max().item(),
            "max_abs_diff_grad": max(
                (a.grad.float() - b.grad).abs().max().item() for a, b in zip(inputs, ref_in)
            ),
        }
        for _ in range(2):  # warm-up, then time forward + backward
            varlen_causal_attention(*inputs, segments, 0.0, use_flash).backward(grad_out)
        synchronize(dev)
        started, repeats = time.perf_counter(), 5
        for _ in range(repeats):
            varlen_causal_attention(*inputs, segments, 0.0, use_flash).backward(grad_out)
        synchronize(dev)
        result[name]["fwd_bwd_ms"] = (time.perf_counter() - started) / repeats * 1e3
    return result


def matmul_tflops(dev: torch.device, size: int) -> float:
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(dev)
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    synchronize(dev)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def train_records(text: str) -> list[dict]:
    from train_kernel.config import config_from_text
    from train_kernel.train.trainer import train

    train(config_from_text(text))
    run_dir = Path(config_from_text(text).run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def fp16_check(work: Path, small: dict) -> dict:
    rows = train_records(CONFIG.format(dtype="torch.float16", run_dir=str(work / "fp16"), **small))
    return {
        "skipped_steps": rows[-1]["inf_nan_skip_batches"],
        "loss_scale": rows[-1]["loss_scale"],
        "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]],
    }


NCCL_PROGRAM = """
import torch, torch.distributed as dist
from train_kernel.parallel.collectives import average_gradients
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
x = torch.arange(1 << 20, device="cuda", dtype=torch.bfloat16)
dist.all_reduce(x); dist.broadcast(x, src=0)
gathered = torch.empty(1 << 20, device="cuda", dtype=torch.bfloat16)
dist.all_gather_into_tensor(gathered, x)
p = torch.nn.Parameter(torch.ones(1000, device="cuda")); p.grad = torch.full_like(p, 3.0)
average_gradients([p], dist.group.WORLD, 1)
ok = bool(torch.equal(gathered, x)) and bool((p.grad == 3.0).all())
print("NCCL", dist.get_backend(), torch.cuda.nccl.version(), ok, flush=True)
dist.destroy_process_group()
"""


def nccl_check(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"skipped": "no CUDA device"}
    done = subprocess.run(
        [sys.executable, "-c", NCCL_PROGRAM],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    line = next((row for row in done.stdout.splitlines() if row.startswith("NCCL ")), "")
    return {
        "returncode": done.returncode,
        "report": line,
        "ok": line.endswith(" True"),
        "stderr_tail": done.stderr[-800:],
    }


def checkpoint_check(work: Path, small: dict) -> dict:
    save = work / "ckpts"
    ckpt = (
        f"\nckpt = dict(enable_save_ckpt=True, save_ckpt_folder='local:{save}', checkpoint_every=10, "
        f"async_upload=True, async_upload_tmp_folder='{work / 'spool'}')\n"
    )
    whole = train_records(
        CONFIG.format(dtype="torch.bfloat16", run_dir=str(work / "ckpt_whole"), **small) + ckpt
    )
    resume = f"ckpt['load_ckpt_folder'] = 'local:{save}/10'\n"
    resumed = train_records(
        CONFIG.format(dtype="torch.bfloat16", run_dir=str(work / "ckpt_resumed"), **small) + ckpt + resume
    )
    want = {r["step"]: r["loss"] for r in whole}
    diffs = [abs(r["loss"] - want[r["step"]]) / abs(want[r["step"]]) for r in resumed]
    return {
        "resumed_at": resumed[0]["step"],
        "first_step_identical": resumed[0]["loss"] == want[resumed[0]["step"]],
        "max_rel_loss_diff": max(diffs),
        "complete_markers": sorted(int(p.parent.name) for p in save.glob("*/*.step")),
    }


def layers_that_fit(shape: dict, budget_bytes: int) -> tuple[int, int]:
    """The most layers (<= shape['layers']) whose `train-kernel plan` total fits the budget, with
    that total."""
    from train_kernel.config import config_from_text
    from train_kernel.plan import make_plan

    for layers in range(shape["layers"], 0, -1):
        text = CONFIG.format(dtype="torch.bfloat16", run_dir="unused", **{**shape, "layers": layers})
        total = make_plan(config_from_text(text)).memory.total
        if total <= budget_bytes:
            return layers, total
    raise RuntimeError(f"not even one layer of hidden {shape['hidden']} fits {budget_bytes / GIB:.1f} GiB")


def mfu_check(dev: torch.device, work: Path, shape: dict) -> dict:
    result: dict = {}
    if dev.type == "cuda":
        gc.collect()  # the earlier sections' runs are over: their cached blocks go back
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _free, total = torch.cuda.mem_get_info()
        result["device_memory_gib"] = total / GIB
        shape["layers"], result["planned_bytes"] = layers_that_fit(shape, total - MEMORY_MARGIN_BYTES)
    rate = matmul_tflops(dev, 8192 if dev.type == "cuda" else 1024)
    started = time.perf_counter()
    try:
        rows = train_records(CONFIG.format(dtype="torch.bfloat16", run_dir=str(work / "mfu"), **shape))
    except torch.OutOfMemoryError as error:  # the plan undercounted: record it, retry smaller once
        result["out_of_memory_at_layers"] = shape["layers"]
        result["out_of_memory"] = str(error)[:400]
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        shape["layers"] = max(1, shape["layers"] * 3 // 4)
        rows = train_records(CONFIG.format(dtype="torch.bfloat16", run_dir=str(work / "mfu_retry"), **shape))
    result["run_seconds"] = time.perf_counter() - started
    timed = rows[2:] or rows
    tflops = sorted(r["tflops"] for r in timed)[len(timed) // 2]
    result.update(
        shape=shape,
        tflops=tflops,
        matmul_tflops=rate,
        mfu=tflops / rate,
        tgs=sorted(r["tgs"] for r in timed)[len(timed) // 2],
        losses=[r["loss"] for r in rows],
    )
    if dev.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    return result


def dtype_auto_check(dev: torch.device) -> dict:
    """What model.dtype="auto" takes on this device, and why (train_kernel/device_speed.py)."""
    from train_kernel.device_speed import choose_dtype, device_speed

    choice = choose_dtype("auto", dev)
    return {"speed": device_speed(dev).to_json(), "auto": choice.name, "reason": choice.reason}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small shape, for trying the script on CPU")
    parser.add_argument("--out", type=Path, help="also write gpu_check.json here after every section")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=103168)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-num", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.vocab, args.seq_len, args.steps = 256, 2, 4, 1024, 512, 3
    return args


def build_sections(args: argparse.Namespace, dev: torch.device, work: Path) -> dict[str, Callable[[], dict]]:
    from bench.gpu_check_health import oom_check, profiling_check
    from bench.gpu_check_tensor import tensor_parallel_check

    small = {
        "seq_len": 512,
        "micro_num": 2,
        "steps": 20,
        "layers": 2,
        "hidden": 256,
        "heads": 4,
        "vocab": 1024,
        "checkpoint": False,
    }
    shape = {
        "seq_len": args.seq_len,
        "micro_num": args.micro_num,
        "steps": args.steps,
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": args.heads,
        "vocab": args.vocab,
        "checkpoint": True,
    }
    return {
        "attention": lambda: attention_check(dev, *((4, 32) if args.tiny else (8, 128))),
        "fp16": lambda: fp16_check(work, small),
        "nccl": lambda: nccl_check(dev),
        "checkpoint": lambda: checkpoint_check(work, small),
        "mfu": lambda: mfu_check(dev, work, shape),
        "dtype_auto": lambda: dtype_auto_check(dev),
        "profiling": lambda: profiling_check(dev, work),
        "oom": lambda: oom_check(dev, work),
        "tensor_parallel": lambda: tensor_parallel_check(dev, work, args.tiny),
    }


def run_checks(
    sections: dict[str, Callable[[], dict]], wanted: list[str], result: dict, folders: list[Path]
) -> dict:
    """Runs the wanted sections in turn into `result`, each isolated (an exception is recorded as
    the section's error), and rewrites gpu_check.json in every folder after each one."""
    unknown = [name for name in wanted if name not in sections]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    for name in wanted:
        started = time.perf_counter()
        try:
            result[name] = sections[name]()
        except Exception as error:  # noqa: BLE001 - one failed section must not lose the others
            result[name] = {
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-3000:],
            }
        result[name]["section_seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {json.dumps(result[name], default=str)[:1500]}", flush=True)
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def summary_lines(result: dict) -> list[str]:
    """One line per section that says pass / fail / skipped / error (the sections with a verdict)."""
    lines = []
    for name, section in result.items():
        if not isinstance(section, dict):
            continue
        if "error" in section:
            lines.append(f"{name}: ERROR {section['error'][:200]}")
        elif "skipped" in section:
            lines.append(f"{name}: skipped ({section['skipped']})")
        elif "ok" in section:
            why = "; ".join(_problems(section))[:600]
            lines.append(f"{name}: {'pass' if section['ok'] else 'FAIL'}" + (f" ({why})" if why else ""))
        else:
            lines.append(f"{name}: done (figures only)")
    return lines


def _problems(section: dict) -> list[str]:
    found = list(section.get("problems", []))
    for key, part in section.items():
        if isinstance(part, dict):
            found += [f"{key}: {line}" for line in _problems(part)]
            if "skipped" in part:
                found.append(f"{key} skipped")
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dev = device()
    result: dict = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    work = Path(tempfile.mkdtemp())
    sections = build_sections(args, dev, work)
    wanted = args.only.split(",") if args.only else list(sections)
    run_checks(sections, wanted, result, [OUT, *([args.out] if args.out else [])])
    print("summary:\n  " + "\n  ".join(summary_lines(result)), flush=True)
    print(f"written: {OUT / 'gpu_check.json'}", flush=True)


if __name__ == "__main__":
    main()
