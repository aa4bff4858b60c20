"""bench_train's profile of one micro-batch per side, and its baseline, on a tiny shape in-process."""

from __future__ import annotations

import pytest
import torch

from bench.train_baseline import time_steps
from bench.train_profile import SIDES, ceiling_ratio, kernel_class, kernel_seconds

TINY = dict(hidden=64, layers=2, heads=4, seq_len=128, vocab=256, micro_num=2)


def test_kernel_classes():
    assert kernel_class("aten::mm") == kernel_class("aten::addmm") == "gemm"
    assert kernel_class("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert kernel_class("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert kernel_class("aten::mul") == kernel_class("aten::_softmax") == "other"


@pytest.mark.parametrize("side", sorted(SIDES))
def test_both_sides_run_gemms_and_the_same_attention_kernel(side):
    seconds = kernel_seconds(SIDES[side](TINY, "torch.float32"), repeats=1)
    assert set(seconds) == {"gemm", "attention", "other"}
    # Both sides reach PyTorch's attention kernel and BLAS: were one side's attention or matmuls
    # under another operator name, its share would read 0 here and the ceiling would be wrong.
    assert seconds["gemm"] > 0 and seconds["attention"] > 0 and seconds["other"] > 0


def test_ceiling_ratio():
    # 10 s per step against 2 micro-batches of 3 + 1 s of GEMMs and attention: 10 / 8.
    assert ceiling_ratio(10.0, 2, {"gemm": 3.0, "attention": 1.0, "other": 0.5}) == pytest.approx(1.25)


def test_baseline_times_each_step():
    times = time_steps(TINY, 2, torch.float32)
    assert len(times) == 2 and all(t > 0 for t in times)
