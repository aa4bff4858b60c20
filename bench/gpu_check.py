"""The prepared device check (run it when a GPU machine is lent; it also runs on CPU with --tiny).

    python -m bench.gpu_check [--tiny] [--hidden 4096 --layers 32 --heads 32 --steps 6]

1. attention: the packed attention paths on the device (flash-attn's varlen kernel when importable,
   the bucketed SDPA fallback) against a per-document reference, bf16;
2. fp16: a short run with InternLM's dynamic loss scaler, counting skipped steps;
3. checkpoints: a bf16 run saving asynchronously through the private uploader (device tensors to
   the spool), resumed from its step-10 checkpoint: the resumed losses against the uninterrupted run;
4. MFU: `train-kernel`'s trainer on random tokens for the given InternLM size (default: the seed's
   7B, activation checkpointing on), tflops from InternLM's formula over the device's bf16 matmul
   rate measured in the same run.
Writes bench/out/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import save_result

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


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def attention_check(dev: torch.device) -> dict:
    from train_kernel.model.attention import (
        PackedSegments,
        flash_attention_available,
        varlen_causal_attention,
    )

    torch.manual_seed(0)
    lengths = [700, 300, 1048]
    heads, dim = 8, 128
    q, k, v = (torch.randn(sum(lengths), heads, dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 700, 1000, 2048], dtype=torch.int32, device=dev)
    from train_kernel.model.layers import apex_rms_norm_applies

    result = {"flash_attn_used": flash_attention_available(q), "apex_rms_norm_used": apex_rms_norm_applies(q)}
    for use_flash in (True, False):
        out = varlen_causal_attention(q, k, v, PackedSegments(cu), 0.0, use_flash)
        worst = 0.0
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(x[start:end].transpose(0, 1).float() for x in (q, k, v)), is_causal=True
            ).transpose(0, 1)
            worst = max(worst, (out[start:end].float() - ref).abs().max().item())
        result["max_abs_diff_flash" if use_flash else "max_abs_diff_sdpa"] = worst
    return result


def matmul_tflops(dev: torch.device, size: int) -> float:
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def train_records(text: str) -> list[dict]:
    from train_kernel.config import config_from_text
    from train_kernel.train.trainer import train

    train(config_from_text(text))
    run_dir = Path(config_from_text(text).run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def checkpoint_check(work: Path, small: dict) -> dict:
    save = work / "ckpts"
    ckpt = (
        f"\nckpt = dict(enable_save_ckpt=True, save_ckpt_folder='local:{save}', checkpoint_every=10, "
        f"async_upload=True, async_upload_tmp_folder='{work / 'spool'}')\n"
    )
    whole = train_records(CONFIG.format(dtype="torch.bfloat16", run_dir=str(work / "ckpt_whole"), **small) + ckpt)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small shape, for trying the script on CPU")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=103168)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-num", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.heads, args.vocab, args.seq_len, args.steps = 256, 2, 4, 1024, 512, 3
    dev = device()
    result: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    result["attention"] = attention_check(dev)
    work = Path(tempfile.mkdtemp())
    small = dict(seq_len=512, micro_num=2, steps=20, layers=2, hidden=256, heads=4, vocab=1024, checkpoint=False)
    fp16 = train_records(CONFIG.format(dtype="torch.float16", run_dir=str(work / "fp16"), **small))
    result["fp16"] = {
        "skipped_steps": fp16[-1]["inf_nan_skip_batches"],
        "loss_scale": fp16[-1]["loss_scale"],
        "loss_first_last": [fp16[0]["loss"], fp16[-1]["loss"]],
    }
    result["checkpoint"] = checkpoint_check(work, small)
    print("checkpoint:", result["checkpoint"], flush=True)
    rate = matmul_tflops(dev, 8192 if dev.type == "cuda" else 1024)
    shape = dict(seq_len=args.seq_len, micro_num=args.micro_num, steps=args.steps, layers=args.layers,
                 hidden=args.hidden, heads=args.heads, vocab=args.vocab, checkpoint=True)
    rows = train_records(CONFIG.format(dtype="torch.bfloat16", run_dir=str(work / "mfu"), **shape))[2:]
    tflops = sorted(r["tflops"] for r in rows)[len(rows) // 2]
    result["mfu"] = {"shape": shape, "tflops": tflops, "matmul_tflops": rate, "mfu": tflops / rate,
                     "tgs": sorted(r["tgs"] for r in rows)[len(rows) // 2]}
    save_result("gpu_check", result)


if __name__ == "__main__":
    main()
