"""Sequence parallel's reduce-scatter (tensor_parallel._reduce_scatter) through torch's current
name: torch 2.13 deprecates reduce_scatter_tensor (a FutureWarning on every rank) for
reduce_scatter_single. One rank of a real gloo group in this process; the values are the input's."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from train_kernel.parallel.tensor_parallel import TensorGroup, _reduce_scatter


def test_reduce_scatter_uses_no_deprecated_collective():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.arange(24.0).view(2, 3, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = _reduce_scatter(x, 1, TensorGroup(dist.group.WORLD, 0, 1, True))
        torch.testing.assert_close(out, x)
    finally:
        dist.destroy_process_group()
