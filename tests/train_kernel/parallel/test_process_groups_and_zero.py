"""Process-group setup errors, a failing rank, and the ZeRO-1 optimizer's global overflow decision,
on real 2-process gloo groups."""

from __future__ import annotations

import json
import time

import pytest
import torch.distributed as dist

from tests.train_kernel.parallel.launch import run_ranks, train_ranks
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config.sections import ParallelConfig, PipelineConfig
from train_kernel.parallel.layout import LayoutError
from train_kernel.parallel.process_groups import init_parallel


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.distributed
@pytest.mark.parametrize("program", ["overflow", "overflow_dp"])
def test_overflow_on_one_rank_makes_both_ranks_skip(program):
    results = run_ranks(
        ["-m", "tests.train_kernel.parallel.rank_programs", program], world_size=2, timeout=60
    )
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
    outcomes = [_result(r.output) for r in results]
    for outcome in outcomes:
        assert outcome["skipped_updated"] is False and outcome["unchanged"] is True
        assert outcome["scale_after_skip"] == 512  # 1024 backed off once, on both ranks
        assert outcome["second_updated"] is True
    # After the update each rank stepped its own slice; the broadcast made the full weights equal.
    assert outcomes[0]["weights"] == outcomes[1]["weights"]


@pytest.mark.distributed
def test_optimizer_state_saved_per_zero_rank_restores_exactly():
    results = run_ranks(
        ["-m", "tests.train_kernel.parallel.rank_programs", "zero_state_round_trip"], world_size=2, timeout=60
    )
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
    outcomes = [_result(r.output) for r in results]
    # 6*5+5 + 5*3+3 = 53 elements: rank 0 owns [0, 27), rank 1 [27, 53).
    assert [o["partition"] for o in outcomes] == [[0, 27], [27, 53]]
    for outcome in outcomes:
        assert outcome["equal"], outcome["max_diff"]


@pytest.mark.distributed
def test_a_failing_rank_takes_the_job_down_instead_of_hanging():
    started = time.monotonic()
    results = run_ranks(
        ["-m", "tests.train_kernel.parallel.rank_programs", "rank_1_dies"],
        world_size=2,
        timeout=60,
        extra_env={"TRAIN_KERNEL_DIST_TIMEOUT_S": "20"},
    )
    assert results[1].returncode != 0 and "rank 1 fails on purpose" in results[1].output
    assert results[0].returncode != 0, results[0].output[-3000:]
    assert "killed after" not in results[0].output
    assert time.monotonic() - started < 50


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (ParallelConfig(zero1=3), "4", "does not divide the data-parallel size 4"),
        (ParallelConfig(pipeline=PipelineConfig(size=2)), "3", "not divisible by tensor 1 x pipeline 2"),
    ],
)
def test_misconfigurations_fail_before_any_collective(parallel, world, message):
    environ = {"RANK": "0", "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(LayoutError, match=message):
        init_parallel(parallel, environ)
    assert not dist.is_initialized()


def test_single_process_ignores_a_zero1_meant_for_a_cluster():
    context = init_parallel(ParallelConfig(zero1=8), {"RANK": "0", "WORLD_SIZE": "1"})
    assert context.zero_size == 1 and context.dp_size == 1 and not context.distributed


@pytest.mark.distributed
def test_cli_reports_a_bad_layout_on_every_rank_without_waiting_for_peers(tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(tiny_config_text(tmp_path / "run").replace("zero1=1", "zero1=4"))
    started = time.monotonic()
    # Both ranks fail at once: neither waits in a rendezvous for the other.
    results = train_ranks(config_file, world_size=2, timeout=30)
    for result in results:
        assert result.returncode != 0
        assert "parallel.zero1: 4 does not divide the data-parallel size 2" in result.output, result.output[
            -2000:
        ]
        assert "Traceback" not in result.output
    assert time.monotonic() - started < 25
