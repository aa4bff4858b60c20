"""Packed causal attention on the CPU, forward + backward (train_kernel/model/attention.py):

    python -m bench.bench_attention [--tokens 2048 8192 --heads 32 --head-dim 128 --threads 1]

Compares our bucketed SDPA (planner's choice of buckets) with the same kernel forced to one
padded batch of all segments or to one batch per distinct length, a Python loop of one SDPA
call per segment, and a naive SDPA under one block-diagonal causal mask over all tokens.
Segment lengths are log-uniform in [min_len, max_len] (many short documents, a few long).
Prints one line per dtype and row length (best of --reps runs per kernel) and saves them in
bench/out/attention.json."""

from __future__ import annotations

import argparse
import math
import random
import time
from unittest import mock

import torch
import torch.nn.functional as F

from bench.common import save_result
from train_kernel.model import attention
from train_kernel.model.attention import PackedSegments, varlen_causal_attention


def segment_lengths(tokens: int, min_len: int, max_len: int, rng: random.Random) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def naive_masked(q, k, v, lengths):
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(q.shape[0])
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), attn_mask=mask)
    return out[0].transpose(0, 1)


def per_segment_loop(q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        views = (x[None, start : start + n].transpose(1, 2) for x in (q, k, v))  # [1, h, n, d]
        outs.append(F.scaled_dot_product_attention(*views, is_causal=True)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def bucketed(q, k, v, lengths):
    cu = torch.tensor([0] + lengths).cumsum(0)
    return varlen_causal_attention(q, k, v, PackedSegments(cu), use_flash_attn=False)


def with_call_overhead(units: float):
    """Our kernel with the planner's per-call cost forced: inf = one padded batch of all
    segments, 0 = one batch per distinct length."""

    def run(q, k, v, lengths):
        with mock.patch.object(attention, "_CALL_OVERHEAD_UNITS", {"cpu": units, "cuda": units}):
            return bucketed(q, k, v, lengths)

    return run


def time_fwd_bwd(fn, q, k, v, lengths, reps: int) -> float:
    best = math.inf
    for _ in range(reps + 1):  # the first run warms up
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        start = time.perf_counter()
        fn(*inputs, lengths).float().sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=50)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--skip-naive", action="store_true", help="the naive mask is slow at 8192 tokens")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = {
        "bucketed": bucketed,
        "one_padded": with_call_overhead(1e30),
        "per_length": with_call_overhead(0.0),
        "loop": per_segment_loop,
    }
    if not args.skip_naive:
        kernels["naive_mask"] = naive_masked
    rng = random.Random(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in args.tokens:
            lengths = segment_lengths(tokens, args.min_len, min(args.max_len, tokens), rng)
            q, k, v = (torch.randn(tokens, args.heads, args.head_dim, dtype=dtype) for _ in range(3))
            plan = PackedSegments(torch.tensor([0] + lengths).cumsum(0)).sdpa_plan(
                tokens, args.heads * args.head_dim, torch.device("cpu")
            )
            times = {name: time_fwd_bwd(fn, q, k, v, lengths, args.reps) for name, fn in kernels.items()}
            rows.append(
                {
                    "dtype": str(dtype),
                    "tokens": tokens,
                    "segments": len(lengths),
                    "buckets": len(plan.buckets),
                    "seconds": {name: round(t, 4) for name, t in times.items()},
                }
            )
            shown = " ".join(f"{name}={t:.3f}s" for name, t in times.items())
            print(
                f"{dtype!s:15} T={tokens} segments={len(lengths)} buckets={len(plan.buckets)} {shown}",
                flush=True,
            )
    save_result("attention", {"threads": torch.get_num_threads(), "heads": args.heads, "rows": rows})


if __name__ == "__main__":
    main()
