"""Where one micro-batch's forward + backward goes, for both sides of bench_train: GEMMs, the
attention kernel, and everything else (torch profiler, self CPU time per operator).

Both sides run the same GEMMs (same FLOPs, same BLAS) and the same PyTorch attention kernel, so only
"everything else" (norms, RoPE, SwiGLU, the loss, copies) can differ. That bounds what any amount of
work on our side can reach: with nothing but GEMMs and attention,

    ceiling = transformers' step time / (micro_num x (our GEMM + attention seconds)).

`python -m bench.train_profile ours|transformers SHAPE_JSON DTYPE` prints one side's figures as
JSON; each side runs in its own process (bench_train calls it after its timed rounds).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def kernel_class(op_name: str) -> str:
    if op_name in GEMM_OPS:
        return "gemm"
    if "scaled_dot_product" in op_name or "flash_attention" in op_name:
        return "attention"
    return "other"


def kernel_seconds(micro_batch: Callable[[], None], repeats: int = 2) -> dict[str, float]:
    """Self CPU seconds per kernel class of one micro-batch (the mean of `repeats` profiled runs,
    after one warm-up run)."""
    micro_batch()
    seconds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            micro_batch()
    for event in profiler.key_averages():
        seconds[kernel_class(event.key)] += event.self_cpu_time_total / 1e6 / repeats
    return seconds


def ours_micro_batch(shape: dict, dtype: str) -> Callable[[], None]:
    """The trainer's forward + backward of one packed row (one document, as bench_train's runs):
    the model without its head, then the fused head + cross entropy."""
    from train_kernel.model import build_model
    from train_kernel.model.config import ModelConfig
    from train_kernel.train.fused_loss import head_cross_entropy
    from train_kernel.train.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # as the trainer does on CPU
    config = ModelConfig(
        num_layers=shape["layers"],
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        vocab_size=shape["vocab"],
        mlp_ratio=8 / 3,
        dtype=dtype,
        embed_grad_scale=1,
    )
    model = build_model(config)
    seq = shape["seq_len"]
    positions = torch.arange(seq).unsqueeze(0)
    cu_seqlens = torch.tensor([0, seq], dtype=torch.int32)

    def run() -> None:
        ids = torch.randint(0, shape["vocab"], (1, seq))
        hidden = model(ids, positions, cu_seqlens, seq, apply_head=False)
        head_cross_entropy(hidden, model.head.weight, ids).loss.backward()

    return run


def transformers_micro_batch(shape: dict, dtype: str) -> Callable[[], None]:
    from bench.train_baseline import baseline_micro_batch, build_baseline

    return baseline_micro_batch(build_baseline(shape, getattr(torch, dtype.removeprefix("torch."))), shape)


SIDES = {"ours": ours_micro_batch, "transformers": transformers_micro_batch}


def ceiling_ratio(transformers_step_s: float, micro_num: int, ours: dict[str, float]) -> float:
    """The ratio ours / transformers (tokens/s) if our step were only its GEMMs and attention."""
    return transformers_step_s / (micro_num * (ours["gemm"] + ours["attention"]))


if __name__ == "__main__":
    side, shape, dtype = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    print(json.dumps(kernel_seconds(SIDES[side](shape, dtype))))
