"""Freed host memory stays in the process (glibc): a step's temporaries come from the heap and go
back to it, not to the kernel, so the next step does not fault their pages in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# glibc's own accounting (mallinfo2) rather than page-fault counts: faults also come from torch's
# worker threads and the interpreter, which made a fault-based test flaky.
PROGRAM = """
import ctypes, json, sys, torch
from train_kernel.train.host_memory import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
taken = keep_freed_host_memory()
tensors = [torch.ones(1 << 20) for _ in range(16)]  # 16 x 4 MiB, a step's temporaries
held = libc.mallinfo2()
del tensors
freed = libc.mallinfo2()
print(json.dumps({"taken": taken, "mmapped_while_held": held.hblkhd, "heap_free_after": freed.fordblks}))
"""
MIB = 1 << 20


@pytest.mark.process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_temporaries_come_from_the_heap_and_stay_there_once_freed():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["taken"] is True
    # Served from the heap, not as separate mappings the kernel takes back on free...
    assert report["mmapped_while_held"] < 16 * MIB
    # ...and after the free the 64 MiB are still the process's, not trimmed off the heap.
    assert report["heap_free_after"] >= 64 * MIB
