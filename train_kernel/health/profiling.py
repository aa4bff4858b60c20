"""`train-kernel run --profiling`: torch profiler traces of a step range and a per-step memory
summary, written into `<run_dir>/profile/`.

- `trace-rank<R>-steps<a>-<b>.json`: Chrome trace format (open in Perfetto / chrome://tracing;
  TensorBoard's profiler plugin reads the same file);
- `memory-rank<R>.jsonl`: one line per step: peak and current allocated / reserved CUDA memory,
  or the process's resident memory on CPU;
- on CUDA out-of-memory, `oom-snapshot-rank<R>.pickle` (torch.cuda.memory._dump_snapshot, viewable
  at pytorch.org/memory_viz): `oom_snapshot` wraps the whole run, so the allocator's history with
  Python stacks is recorded from before the model is built, and an out-of-memory error while
  building the model or the optimizer, resuming or training is covered. The error then carries a
  note naming the file. Nothing of this runs on CPU.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


# Allocation events the history keeps (a ring buffer): several KB each, the last steps of a run.
HISTORY_ENTRIES = 100_000
MEMORY_VIZ = "https://pytorch.org/memory_viz"


def snapshot_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / FOLDER / f"oom-snapshot-rank{rank}.pickle"


@contextmanager
def oom_snapshot(run_dir: str | Path, rank: int, enabled: bool) -> Iterator[None]:
    """Around a whole run on CUDA: with `enabled` (--profiling), the caching allocator records its
    history, and a torch.OutOfMemoryError leaving the block writes the snapshot (the tensors that
    the error's traceback still holds are in it) and gets a note naming the file. Without it, the
    error's note says how to get one. On CPU it does nothing (CPU allocation failures are plain
    RuntimeErrors, and no torch.cuda function is called)."""
    if not torch.cuda.is_available():
        yield
        return
    if enabled:
        # Python stacks only: C++ frames make the dump take minutes to symbolise on a large run.
        torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES, stacks="python")
    try:
        yield
    except torch.OutOfMemoryError as error:
        if enabled:
            path = _dump_snapshot(snapshot_path(run_dir, rank))
            _tell(
                error,
                f"rank {rank}: CUDA memory snapshot at the error: {path} (open it at {MEMORY_VIZ})"
                if path is not None
                else f"rank {rank}: the CUDA memory snapshot could not be written (see the log)",
            )
        else:
            _tell(
                error,
                "`train-kernel run --profiling` records a CUDA memory snapshot at an out-of-memory "
                "error; `train-kernel plan` estimates the memory per rank",
            )
        raise
    finally:
        if enabled:  # the history's buffer and its per-allocation cost end with the run
            torch.cuda.memory._record_memory_history(enabled=None)


def _tell(error: BaseException, note: str) -> None:
    """A note printed with the error's traceback (Python 3.11+); logged on 3.10."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        log.error("%s", note)


def _dump_snapshot(path: Path) -> Path | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
    except (RuntimeError, OSError) as error:  # the run's own error matters more than this one
        log.warning("out of memory: no CUDA memory snapshot (%s)", error)
        return None
    log.error("out of memory: CUDA memory snapshot in %s (view it at %s)", path, MEMORY_VIZ)
    return path


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0
