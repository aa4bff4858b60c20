"""The project's `train-kernel run` as child processes, for the device checks: every run bounded in
time (a run past its limit is killed with its whole process group and reported, never waited on),
its output in a log file (a rank that writes much cannot block on a full pipe while its partner
waits in a collective), and its metrics.jsonl train records read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, free_port, rank_env


@dataclass
class ChildRun:
    returncode: int | None  # None: killed at the time limit
    seconds: float
    log: Path

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, chars: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""


def project_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that imports the project from this checkout."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def train_args(config: Path, *extra: str) -> list[str]:
    return ["-m", "train_kernel.cli", "run", "--config", str(config), *extra]


def run_ranks(
    args: list[str], world: int, timeout_s: float, logs: Path, extra_env: dict[str, str] | None = None
) -> list[ChildRun]:
    """`python <args>` once per rank, as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); every rank still running at the shared deadline is killed."""
    logs.mkdir(parents=True, exist_ok=True)
    port, started = free_port(), time.perf_counter()
    children = []
    for rank in range(world):
        env = project_env({**rank_env(rank, world, port), **(extra_env or {})})
        log = logs / f"rank{rank}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed with any children it started
            )
        children.append((process, log))
    deadline = started + timeout_s
    results = []
    for process, log in children:
        try:
            process.wait(timeout=max(0.0, deadline - time.perf_counter()))
            code: int | None = process.returncode
        except subprocess.TimeoutExpired:
            _kill_group(process)
            code = None
        results.append(ChildRun(code, time.perf_counter() - started, log))
    return results


def run_child(
    args: list[str], timeout_s: float, log: Path, extra_env: dict[str, str] | None = None
) -> ChildRun:
    """One plain process (no torchrun variables): `python <args>`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=project_env(extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        process.wait(timeout=timeout_s)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        _kill_group(process)
        code = None
    return ChildRun(code, time.perf_counter() - started, log)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def train_records(run_dir: Path) -> list[dict]:
    """The run's train records (metrics.jsonl), in step order; [] when there are none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("kind") == "train"]


def step_seconds(records: list[dict], world: int) -> list[float]:
    """Each step's wall time from its record: tgs is the step's tokens / world size / seconds."""
    seconds, consumed = [], 0
    for row in records:
        tokens = row["num_consumed_tokens"] - consumed
        consumed = row["num_consumed_tokens"]
        seconds.append(tokens / world / row["tgs"])
    return seconds
