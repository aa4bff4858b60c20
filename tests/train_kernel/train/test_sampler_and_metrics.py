from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from train_kernel.config import DataConfig
from train_kernel.data.sampler import BatchSampler, Rampup
from train_kernel.train.log_line import format_log_line
from train_kernel.train.token_metrics import TokenMetrics


def test_data_parallel_ranks_split_the_single_process_batch():
    single = BatchSampler(num_rows=37, micro_num=8, seed=1)
    ranks = [BatchSampler(num_rows=37, micro_num=4, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(12):  # crosses several epochs
        whole = single.next_batch(step).rows
        assert np.array_equal(np.concatenate([s.next_batch(step).rows for s in ranks]), whole)
    assert single.epoch >= 2


def test_epochs_visit_every_row_once_in_a_new_order():
    sampler = BatchSampler(num_rows=30, micro_num=5, seed=7)
    epochs = [np.concatenate([sampler.next_batch(i).rows for i in range(6)]) for _ in range(3)]
    assert epochs[0].tolist() == list(range(30))
    for order in epochs[1:]:
        assert sorted(order.tolist()) == list(range(30))
    assert epochs[1].tolist() != epochs[0].tolist() and epochs[2].tolist() != epochs[1].tolist()


def test_state_restores_the_exact_sequence_and_rampup_and_skips():
    sampler = BatchSampler(num_rows=50, micro_num=4, seed=3, rampup=Rampup(1, 1, 2), skip_batches=(2,))
    assert [sampler.micro_num_at(s) for s in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    first = [sampler.next_batch(s) for s in range(3)]
    assert [b.skipped for b in first] == [False, False, True]
    state = sampler.state_dict()
    expected = [sampler.next_batch(s).rows.tolist() for s in range(3, 10)]
    resumed = BatchSampler(num_rows=50, micro_num=4, seed=3, rampup=Rampup(1, 1, 2), skip_batches=(2,))
    resumed.load_state_dict(state)
    assert [resumed.next_batch(s).rows.tolist() for s in range(3, 10)] == expected
    assert resumed.skipped == 1


def test_the_sampler_ramps_up_as_the_config_says():
    data = DataConfig(micro_num=7, rampup_batch_size="1 2 10")
    sampler = BatchSampler(num_rows=50, micro_num=7, seed=3, rampup=data.rampup)
    assert [sampler.micro_num_at(s) for s in range(45)] == [data.micro_num_at(s) for s in range(45)]
    assert data.rampup.micro_nums(7) == [1, 3, 5, 7]


def test_token_metrics_per_type():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[1, 2, -100, 4, 5, 6], [7, -100, 9, 10, 0, -100]])
    types = torch.tensor([[0, 0, 0, 2, 2, 2], [2, 2, 2, 2, -1, -1]])
    labels[1, 4] = -100  # padding has no label
    metrics = TokenMetrics({0: "en", 1: "cn", 2: "code"})
    metrics.update(logits, labels, types)
    summary = metrics.summary()
    keep = labels != -100
    losses = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    assert summary["tokens/en"] == 2 and summary["tokens/cn"] == 0 and summary["tokens/code"] == 6
    assert summary["loss_from_metric"] == round(losses.mean().item(), 4)
    assert summary["perplexity"] == round(math.exp(losses.double().mean().item()), 4)
    assert math.isnan(summary["loss/cn"]) and summary["acc/cn"] == 0.0
    correct = (logits[keep].argmax(-1) == labels[keep]).float().mean().item()
    assert summary["acc"] == round(correct, 4)
    assert list(summary)[:2] == ["acc", "perplexity"]


def test_log_line_matches_seed_format():
    record = {
        "tflops": 1.5,
        "step": 0,
        "loss": 11.6,
        "tgs": 1424.93,
        "lr": 4e-07,
        "loss_scale": 65536.0,
        "grad_norm": {"0_default": 66.5},
        "micro_num": 4,
        "loss/cn": float("nan"),
        "time": 1.0,
        "eta_s": 3725,
    }
    assert format_log_line(record) == (
        "tflops=1.5 step=0 loss=11.6 tgs (tokens/gpu/second)=1424.93 lr=4e-07 loss_scale=65536.0 "
        "grad_norm={'0_default': 66.5} micro_num=4 loss/cn=nan eta=1:02:05"
    )
