"""Stragglers: ranks whose step time exceeds `diag_outlier_ratio` x the median of all ranks
(InternLM's data.diag_outlier_ratio, checked every data.empty_cache_and_diag_interval steps)."""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist


def find_stragglers(step_times: list[float], ratio: float) -> list[int]:
    """Ranks (indices) slower than `ratio` x the median step time."""
    if len(step_times) < 2:
        return []
    median = statistics.median(step_times)
    return [rank for rank, seconds in enumerate(step_times) if median > 0 and seconds > ratio * median]


def gather_step_times(seconds: float, distributed: bool, device: torch.device | None = None) -> list[float]:
    """Every rank's step time, in rank order (one all-gather over the world; all ranks call it)."""
    if not distributed:
        return [seconds]
    mine = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL needs the GPU
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [float(t.item()) for t in out]


def describe(step_times: list[float], stragglers: list[int], hosts: list[str] | None = None) -> str:
    median = statistics.median(step_times)
    named = ", ".join(
        f"rank {r}{f' ({hosts[r]})' if hosts else ''} {step_times[r]:.3f} s" for r in stragglers
    )
    return f"straggler(s): {named}; median step time {median:.3f} s over {len(step_times)} ranks"
