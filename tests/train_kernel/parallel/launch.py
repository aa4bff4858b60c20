"""Starts the ranks of a small gloo job as real processes, as torchrun would (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests import zygote


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
    then fails on their return codes instead of hanging). `-m module` jobs are forked from the
    tests' fork server (tests/zygote.py: the same processes, without a torch import each)."""
    port = free_port()
    envs = [
        {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        for rank in range(world_size)
    ]
    server = zygote.server() if args[0] == "-m" else None
    if server is not None and all(server.can_fork(env) for env in envs):
        with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
            processes = [
                server.spawn(args[1:], env, Path(folder) / f"rank{rank}.log") for rank, env in enumerate(envs)
            ]
            codes = _wait_all(processes, timeout)
            return [
                RankResult(rank, code, process.output() + note)
                for rank, (process, (code, note)) in enumerate(zip(processes, codes, strict=True))
            ]
    processes = [
        subprocess.Popen(
            [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for env in envs
    ]
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


def _wait_all(processes: list[zygote.ForkedProcess], timeout: float) -> list[tuple[int, str]]:
    """Each rank's exit code, and a note for those killed when `timeout` passed."""
    deadline = time.monotonic() + timeout
    codes = []
    for rank, process in enumerate(processes):
        try:
            codes.append((process.wait(max(0.0, deadline - time.monotonic())), ""))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            codes.append((process.wait(30), f"\n[rank {rank} killed after {timeout} s]"))
    return codes


def train_ranks(
    config_file, world_size: int, timeout: float = 60, extra_env: dict | None = None
) -> list[RankResult]:
    return run_ranks(
        ["-m", "train_kernel.cli", "run", "--launcher", "torch", "--config", str(config_file)],
        world_size,
        timeout,
        extra_env,
    )
