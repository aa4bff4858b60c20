"""hybrid_zero_optimizer.overlap_sync_param: ZeRO-1's broadcast of the updated slices runs during
the next forward (each layer waits only for its own slices) and trains exactly as the broadcast
awaited inside the step (real two-rank gloo processes)."""

from __future__ import annotations

import json

import pytest

from tests.train_kernel.parallel.launch import run_ranks, train_ranks
from tests.train_kernel.parallel.test_data_parallel_training import records
from tests.train_kernel.train.tiny_config import tiny_config_text

pytestmark = pytest.mark.distributed

STEPS = 4


def test_forward_waits_layer_by_layer_and_matches_the_synchronous_broadcast():
    results = run_ranks(
        ["-m", "tests.train_kernel.parallel.rank_programs", "overlapped_param_sync"], world_size=2
    )
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
        line = next(line for line in result.output.splitlines() if line.startswith("RESULT "))
        got = json.loads(line[len("RESULT ") :])
        assert got["in_flight_after_step"], "the step waited for the broadcasts itself"
        assert got["waited_in_forward"] >= 1
        assert got["same_output"] and got["ranks_agree"]


def test_training_with_and_without_the_overlap_is_identical(tmp_path):
    runs = {}
    for name, flag in (("on", True), ("off", False)):
        config_file = tmp_path / f"{name}.py"
        text = tiny_config_text(tmp_path / name, micro_num=2, total_steps=STEPS)
        text = text.replace("parallel = dict(zero1=1)", "parallel = dict(zero1=2)")
        text = text.replace(
            "hybrid_zero_optimizer = dict(clip_grad_norm=1.0)",
            f"hybrid_zero_optimizer = dict(clip_grad_norm=1.0, overlap_sync_param={flag})",
        )
        config_file.write_text(text)
        results = train_ranks(config_file, world_size=2)
        for result in results:
            assert result.returncode == 0, result.output[-3000:]
        runs[name] = (records(tmp_path / name), results[0].output)
    (on, on_log), (off, off_log) = runs["on"], runs["off"]
    assert "parameter broadcast overlapped" in on_log and "parameter broadcast overlapped" not in off_log
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
