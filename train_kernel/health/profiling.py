"""`train-kernel run --profiling`: torch profiler traces of a step range and a per-step memory
summary, written into `<run_dir>/profile/`.

- `trace-rank<R>-steps<a>-<b>.json`: Chrome trace format (open in Perfetto / chrome://tracing;
  TensorBoard's profiler plugin reads the same file);
- `memory-rank<R>.jsonl`: one line per step: peak and current allocated / reserved CUDA memory,
  or the process's resident memory on CPU;
- on CUDA out-of-memory, `oom-snapshot-rank<R>.pickle` (torch.cuda.memory._dump_snapshot, viewable
  at pytorch.org/memory_viz), recorded from the start of the run when profiling is on.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FOLDER = "profile"


class StepProfiler:
    """`start(step)` before a step's work, `end(step)` after it; traces steps [first, last]."""

    def __init__(self, run_dir: str | Path, rank: int, device: torch.device, first: int, last: int) -> None:
        self.folder = Path(run_dir) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.device = device
        self.first, self.last = first, last
        self.trace_path = self.folder / f"trace-rank{rank}-steps{first}-{last}.json"
        self.memory_path = self.folder / f"memory-rank{rank}.jsonl"
        self._profiler: torch.profiler.profile | None = None
        self._done = False
        if device.type == "cuda":
            try:  # so that an out-of-memory error can be explained afterwards
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            except (RuntimeError, AttributeError) as error:
                log.warning("profiling: no CUDA memory history (%s)", error)
        log.info(
            "profiling: trace of steps %d..%d into %s; memory per step into %s",
            first,
            last,
            self.trace_path,
            self.memory_path,
        )

    def start(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if step == self.first and not self._done and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(
                activities=activities, record_shapes=True, profile_memory=True, with_stack=False
            )
            self._profiler.__enter__()

    def end(self, step: int) -> None:
        if self._profiler is not None:
            self._profiler.step()
            if step >= self.last:
                self._finish()
        self._write_memory(step)

    def close(self) -> None:
        """At the end of training (also when the run ends inside the range)."""
        if self._profiler is not None:
            self._finish()

    def _finish(self) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        profiler.export_chrome_trace(str(self.trace_path))
        self._done = True
        log.info("profiling: trace written to %s", self.trace_path)

    def _write_memory(self, step: int) -> None:
        if self.device.type == "cuda":
            record = {
                "step": step,
                "max_allocated_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "allocated_mb": torch.cuda.memory_allocated(self.device) / 2**20,
                "reserved_mb": torch.cuda.memory_reserved(self.device) / 2**20,
                "max_reserved_mb": torch.cuda.max_memory_reserved(self.device) / 2**20,
            }
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            record = {
                "step": step,
                "rss_mb": _rss_bytes() / 2**20,
                "max_rss_mb": peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20,
            }
        with open(self.memory_path, "a", encoding="utf-8") as handle:
            handle.write(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in record.items()}) + "\n"
            )

    def out_of_memory(self) -> Path | None:
        """Writes the CUDA memory snapshot (call on torch.cuda.OutOfMemoryError); its path or None."""
        if self.device.type != "cuda":
            return None
        path = self.folder / f"oom-snapshot-rank{self.rank}.pickle"
        try:
            torch.cuda.memory._dump_snapshot(str(path))
        except (RuntimeError, AttributeError, OSError) as error:
            log.warning("profiling: no memory snapshot (%s)", error)
            return None
        log.error(
            "out of memory: CUDA memory snapshot in %s (view it at https://pytorch.org/memory_viz)", path
        )
        return path


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0
