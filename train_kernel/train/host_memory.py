"""Keeps freed host memory inside the process during CPU training.

A CPU training step allocates and frees the same tens-of-MB tensors every micro-batch (activation
gradients, the [vocab, hidden] weight gradients, chunk buffers). glibc hands the larger ones back to
the kernel (mmap'd chunks, and the top of the heap past its trim threshold), so the next step
faults every page in again: 55-125 thousand page faults per step for InternLM hidden 512 / vocab
32k / 2 x 2048 tokens (BENCHMARKS.md), about as many as there are pages in those tensors. Serving
allocations of up to 32 MiB from the heap and trimming it only past 1 GiB of free space brings that
to about zero. The cost is that a process keeps up to that much freed memory mapped; a training
process reuses it on the next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest accepted value on 64-bit hosts


def keep_freed_host_memory() -> bool:
    """Applies the thresholds above when the C library is glibc; True when both were taken."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    taken = (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    )
    if not taken:
        log.debug("mallopt refused the host memory thresholds")
    return taken
