"""Resuming with another data-parallel / ZeRO size re-partitions the optimizer state: a checkpoint
of two gloo ranks (ZeRO-1 over both) resumes in one process, and one process's checkpoint resumes
on two ranks, each continuing the same losses as the uninterrupted run (fp32, rel 1e-5: the
gradient all-reduce sums in another order than one process's accumulation). The global batch is
kept by changing micro_num with the rank count, as a user would."""

from __future__ import annotations

import pytest

from tests.train_kernel.checkpoint.helpers import config_text, train_records
from tests.train_kernel.parallel.launch import train_ranks
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train

pytestmark = pytest.mark.distributed

STEPS = 4


def _two_rank_config(path, run_dir, extra=""):
    text = config_text(run_dir, micro_num=2, total_steps=STEPS, checkpoint_every=2, extra=extra)
    path.write_text(text.replace("parallel = dict(zero1=1)", "parallel = dict(zero1=2)"))
    return path


def _assert_same_losses(got, want):
    want = {r["step"]: r["loss"] for r in want}
    assert got, "no steps trained"
    for record in got:
        assert record["loss"] == pytest.approx(want[record["step"]], rel=1e-5), record["step"]


def test_two_ranks_to_one_and_one_to_two(tmp_path):
    single = tmp_path / "single"
    train(config_from_text(config_text(single, micro_num=4, total_steps=STEPS, checkpoint_every=2)))
    two = tmp_path / "two"
    for result in train_ranks(_two_rank_config(tmp_path / "two.py", two), world_size=2):
        assert result.returncode == 0, result.output[-3000:]

    # Two ranks -> one process.
    down = tmp_path / "down"
    text = config_text(
        down, micro_num=4, total_steps=STEPS, extra=f"\nckpt['load_ckpt_folder'] = 'local:{two}/ckpt/2'\n"
    )
    train(config_from_text(text))
    got = train_records(down)
    assert [r["step"] for r in got] == [2, 3]
    _assert_same_losses(got, train_records(two))
    _assert_same_losses(got, train_records(single))

    # One process -> two ranks.
    up = tmp_path / "up"
    config = _two_rank_config(
        tmp_path / "up.py", up, extra=f"\nckpt['load_ckpt_folder'] = 'local:{single}/ckpt/2'\n"
    )
    results = train_ranks(config, world_size=2)
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
    assert "optimizer re-partitioned from ZeRO size 1 to 2" in results[0].output
    got = train_records(up)
    assert [r["step"] for r in got] == [2, 3]
    _assert_same_losses(got, train_records(single))
