"""RMSNorm forward + backward: the hand-written backward (`_RMSNormFunction`) against autograd's
graph of F.rms_norm, side by side, on the CPU or the GPU.

    python -m bench.bench_rms_norm [--tokens 2048 --hidden 512] [--device cuda]

Prints milliseconds per norm (median of alternating rounds) and the largest gradient difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from train_kernel.model.layers import _RMSNormFunction


def autograd_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(weight.dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x0 = torch.randn(args.tokens, args.hidden, device=device).to(torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(args.hidden, device=device)).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn_like(x0)
    variants = {
        "hand_written": lambda x: _RMSNormFunction.apply(x, weight, 1e-5),
        "autograd": lambda x: autograd_norm(x, weight, 1e-5),
    }

    def run(norm) -> torch.Tensor:
        x = x0.detach().requires_grad_()
        norm(x).backward(upstream)
        weight.grad = None
        return x.grad

    grads = {name: run(norm) for name, norm in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    repeats = 50 if device.type == "cuda" else 20
    for _ in range(args.rounds):
        for name, norm in variants.items():
            run(norm)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                run(norm)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) / repeats * 1e3)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": [args.tokens, args.hidden],
        "ms_per_norm": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "max_grad_diff": (grads["hand_written"].float() - grads["autograd"].float()).abs().max().item(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
