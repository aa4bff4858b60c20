"""The hang watchdog (stacks of every thread, the alert callback, a prompt non-zero exit) and the
step profiler (a Chrome trace that json and torch's own loader read; memory per step)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from train_kernel.health.profiling import StepProfiler
from train_kernel.health.watchdog import HANG_EXIT_CODE, HangWatchdog, format_all_stacks


def _parked(event: threading.Event) -> None:
    event.wait()


def test_stacks_name_every_thread():
    event = threading.Event()
    thread = threading.Thread(target=_parked, args=(event,), name="parked-worker", daemon=True)
    thread.start()
    try:
        text = format_all_stacks()
    finally:
        event.set()
    assert "Thread parked-worker" in text and "in _parked" in text
    assert "Thread MainThread" in text and "test_stacks_name_every_thread" in text


def test_watchdog_fires_once_progress_stops(tmp_path):
    exits, hangs = [], []
    dog = HangWatchdog(
        0.5, tmp_path, rank=3, on_hang=lambda *a: hangs.append(a), exit=exits.append, poll_s=0.05, grace_s=60
    )
    try:
        for step in range(5):  # progress keeps it quiet
            time.sleep(0.2)
            dog.beat(step)
        assert not exits
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        dog.close()
    assert exits == [HANG_EXIT_CODE]
    (step, seconds, path) = hangs[0]
    assert step == 4 and seconds >= 0.5 and path == tmp_path / "health" / "stacks-rank3.txt"
    text = path.read_text()
    assert "rank 3" in text and "since step 4 began" in text and "Thread hang-watchdog" in text


@pytest.mark.process
def test_stuck_process_exits_promptly_with_stacks(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from train_kernel.health.watchdog import HangWatchdog
        dog = HangWatchdog(1.0, {str(tmp_path)!r}, rank=0, grace_s=30)
        dog.beat(7)
        def stuck_in_collective():
            time.sleep(600)
        stuck_in_collective()
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == HANG_EXIT_CODE, result.stderr
    assert time.monotonic() - started < 20
    text = (tmp_path / "health" / "stacks-rank0.txt").read_text()
    assert "stuck_in_collective" in text and "since step 7 began" in text


def test_profiler_writes_a_loadable_trace_and_memory_per_step(tmp_path):
    profiler = StepProfiler(tmp_path, rank=0, device=torch.device("cpu"), first=1, last=2)
    weight = torch.randn(64, 64)
    for step in range(4):
        profiler.start(step)
        with torch.profiler.record_function(f"my_step_{step}"):
            (weight @ weight).sum()
        profiler.end(step)
    profiler.close()
    trace = json.loads((tmp_path / "profile" / "trace-rank0-steps1-2.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"my_step_1", "my_step_2"} <= names and "my_step_0" not in names and "my_step_3" not in names
    assert any("aten::mm" == name for name in names)
    memory = [
        json.loads(line) for line in (tmp_path / "profile" / "memory-rank0.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in memory] == [0, 1, 2, 3] and all(m["max_rss_mb"] > 0 for m in memory)
