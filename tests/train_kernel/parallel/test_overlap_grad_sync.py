"""hybrid_zero_optimizer.overlap_sync_grad: the data-parallel gradient all-reduce started bucket by
bucket during the last micro-batch's backward gives the same training as the reduction after
backward (real two-rank gloo processes)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_kernel.parallel.launch import run_ranks, train_ranks
from tests.train_kernel.parallel.test_data_parallel_training import records
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.model import load_model_state

pytestmark = pytest.mark.distributed

STEPS = 4


def _two_rank_run(tmp_path, name: str, optimizer: str):
    config_file = tmp_path / f"{name}.py"
    text = tiny_config_text(tmp_path / name, micro_num=2, total_steps=STEPS, save=True)
    config_file.write_text(text.replace("hybrid_zero_optimizer = dict(clip_grad_norm=1.0)", optimizer))
    results = train_ranks(config_file, world_size=2)
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    _, weights = load_model_state(tmp_path / name / "ckpt" / str(STEPS))
    return records(tmp_path / name), weights, results[0].output


def test_overlap_on_and_off_train_the_same(tmp_path):
    # 2,000 elements per bucket: the tiny model (~60k parameters) needs dozens of buckets.
    on, on_weights, on_output = _two_rank_run(
        tmp_path,
        "on",
        "hybrid_zero_optimizer = dict(clip_grad_norm=1.0, overlap_sync_grad=True, reduce_bucket_size=2000)",
    )
    off, off_weights, off_output = _two_rank_run(
        tmp_path, "off", "hybrid_zero_optimizer = dict(clip_grad_norm=1.0, overlap_sync_grad=False)"
    )
    assert "overlapped with backward" in on_output and "overlapped with backward" not in off_output
    buckets = int(on_output.split("overlapped with backward: ")[1].split()[0])
    assert buckets > 5
    assert len(on) == len(off) == STEPS
    for a, b in zip(on, off):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"]["0_default"] == pytest.approx(b["grad_norm"]["0_default"], rel=1e-6)
    assert on_weights.keys() == off_weights.keys()
    for key, expected in off_weights.items():
        torch.testing.assert_close(on_weights[key], expected, rtol=1e-6, atol=0, msg=key)


def test_buckets_start_during_the_last_backward_only_and_sum_exactly():
    results = run_ranks(
        ["-m", "tests.train_kernel.parallel.rank_programs", "overlapped_grad_reduce"],
        world_size=2,
        timeout=60,
    )
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
        (line,) = [x for x in result.output.splitlines() if x.startswith("RESULT ")]
        out = json.loads(line[len("RESULT ") :])
        assert out["buckets"] == 3
        assert out["pending_after_first"] == 0  # the first micro-batch's backward did not communicate
        assert out["started"] == 3  # every bucket started from a hook, during the last backward
        assert out["equal"] and out["equal_unarmed"]
