"""Freed host memory stays in the process: a repeated allocation pattern stops faulting pages in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROGRAM = """
import json, resource, sys, torch
from train_kernel.train.host_memory import keep_freed_host_memory
taken = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(5 << 20) for _ in range(3)]  # 3 x 20 MiB, as a step's activation gradients
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"taken": taken, "faults": faults}))
"""
PAGES = 3 * (20 << 20) // 4096


def run(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_repeated_allocations_stop_faulting_once_freed_memory_is_kept():
    kept, default = run("keep"), run("default")
    assert kept["taken"] is True
    # glibc's defaults give the 20 MiB blocks back to the kernel: every round faults them in again.
    assert min(default["faults"]) > PAGES // 2
    # Kept: once the heap holds them, later rounds reuse the same pages.
    assert max(kept["faults"][2:]) < PAGES // 100
