"""Starts the ranks of a small gloo job as real processes, as torchrun would (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def run_ranks(
    args: list[str], world_size: int, timeout: float = 60, extra_env: dict | None = None
) -> list[RankResult]:
    """Runs `python <args>` once per rank; kills every rank left when `timeout` passes (the test
    then fails on their return codes instead of hanging)."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    results = []
    for rank, process in enumerate(processes):
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            output, _ = process.communicate()
            output += f"\n[rank {rank} killed after {timeout} s]"
        results.append(RankResult(rank, process.returncode, output))
    return results


def train_ranks(
    config_file, world_size: int, timeout: float = 60, extra_env: dict | None = None
) -> list[RankResult]:
    return run_ranks(
        ["-m", "train_kernel.cli", "run", "--launcher", "torch", "--config", str(config_file)],
        world_size,
        timeout,
        extra_env,
    )
