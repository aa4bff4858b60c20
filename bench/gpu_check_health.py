"""The device checks of training health's CUDA paths (issue 17), through `train-kernel run`:

- profiling: a short run with --profiling; its Chrome trace must hold CPU operators and, on CUDA,
  CUDA kernels; its per-step memory file must have a row per step with CUDA figures (allocated,
  reserved and their peaks) on CUDA, resident memory on CPU;
- oom: a run whose caching allocator is capped at OOM_CAP_BYTES (set_per_process_memory_fraction
  in that child process only: the device's settings are not touched, and the rest of the GPU stays
  free for the driver and the other checks) and whose micro-batch cannot fit under the cap. It
  must end with exit code 1 and torch.OutOfMemoryError naming the snapshot, and the snapshot must
  load (pickle of torch.cuda.memory._snapshot(): "segments", "device_traces" with an "oom" entry).
  CUDA only: on CPU the section says so.

Each check returns "ok" and, when not ok, "problems" saying why; the helpers that read a trace, a
memory file or a snapshot are plain functions (tests/bench runs them on CPU).
"""

from __future__ import annotations

import gc
import json
import pickle
from collections import Counter
from pathlib import Path

import torch

from bench.cli_runs import ChildRun, run_child, train_args, train_records

PROFILE_TIMEOUT_S = 90
OOM_TIMEOUT_S = 90
PROFILE_STEPS = (2, 3)
PROFILE_CONFIG = """
JOB_NAME = "gpu_check_profiling"
data = dict(seq_len=1024, micro_num=2, micro_bsz=1, total_steps={steps})
adam = dict(lr=1e-4)
model = dict(num_layers=2, hidden_size=256, num_attention_heads=4, mlp_ratio=8 / 3,
             vocab_size=1024, dtype="auto", checkpoint=False, use_flash_attn=True)
parallel = dict(zero1=1)
health = dict(profile_steps={profile_steps})
run_dir = {run_dir!r}
"""
PROFILE_TOTAL_STEPS = 5

# The allocator's cap in the OOM child: the model (2.2 M parameters) and its optimizer take ~50 MB;
# one layer's activations of the 262,144-token micro-batch take several GB.
OOM_CAP_BYTES = 1 << 30
OOM_CONFIG = """
JOB_NAME = "gpu_check_oom"
data = dict(seq_len=262144, micro_num=1, micro_bsz=1, total_steps=2)
adam = dict(lr=1e-4)
model = dict(num_layers=2, hidden_size=256, num_attention_heads=4, mlp_ratio=8 / 3,
             vocab_size=1024, dtype="torch.bfloat16", checkpoint=False, use_flash_attn=True)
parallel = dict(zero1=1)
run_dir = {run_dir!r}
"""
# The child: this process's allocator capped, then the project's CLI as a user runs it.
OOM_PROGRAM = """
import sys, torch
torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]))
from train_kernel.cli import main
main(["run", "--config", sys.argv[2], "--profiling"])
"""


def release_cached_memory(dev: torch.device) -> None:
    """Earlier sections' cached blocks back to the device, so that a child has room."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# --- profiling ----------------------------------------------------------------------------------


def profiling_check(dev: torch.device, work: Path, timeout_s: float = PROFILE_TIMEOUT_S) -> dict:
    release_cached_memory(dev)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "profiling"
    config = work / "profiling_config.py"
    config.write_text(
        PROFILE_CONFIG.format(steps=PROFILE_TOTAL_STEPS, profile_steps=PROFILE_STEPS, run_dir=str(run_dir))
    )
    run = run_child(train_args(config, "--profiling"), timeout_s, work / "profiling.log")
    result: dict = {"returncode": run.returncode, "run_seconds": round(run.seconds, 1)}
    problems = _run_problems(run, timeout_s)
    cuda = dev.type == "cuda"
    first, last = PROFILE_STEPS
    trace = run_dir / "profile" / f"trace-rank0-steps{first}-{last}.json"
    if trace.is_file():
        result["trace"] = trace_summary(trace)
        problems += trace_problems(result["trace"], cuda)
    else:
        problems.append(f"no trace file {trace}")
    memory = run_dir / "profile" / "memory-rank0.jsonl"
    if memory.is_file():
        rows = [json.loads(line) for line in memory.read_text().splitlines() if line.strip()]
        result["memory_last_step"] = rows[-1] if rows else None
        problems += memory_problems(rows, cuda, PROFILE_TOTAL_STEPS)
    else:
        problems.append(f"no memory file {memory}")
    result["train_steps"] = len(train_records(run_dir))
    return _verdict(result, problems, run)


def trace_summary(path: Path) -> dict:
    """What a Chrome trace of the profiler holds: events by category, CUDA kernels (a few names),
    memory events by device type (0 CPU, 1 CUDA)."""
    events = json.loads(path.read_text()).get("traceEvents", [])
    categories = Counter(str(event.get("cat")) for event in events)
    kernels = [event.get("name", "") for event in events if event.get("cat") == "kernel"]
    memory_devices = Counter(
        str(event.get("args", {}).get("Device Type")) for event in events if event.get("name") == "[memory]"
    )
    return {
        "events": len(events),
        "categories": dict(categories.most_common(12)),
        "cpu_ops": categories.get("cpu_op", 0),
        "cuda_kernels": len(kernels),
        "kernel_examples": sorted(set(kernels))[:5],
        "memory_events_by_device_type": dict(memory_devices),
        "megabytes": round(path.stat().st_size / 2**20, 1),
    }


def trace_problems(summary: dict, cuda: bool) -> list[str]:
    problems = []
    if summary["cpu_ops"] == 0:
        problems.append("the trace has no CPU operator events (cat 'cpu_op')")
    if cuda and summary["cuda_kernels"] == 0:
        problems.append(
            "the trace has no CUDA kernel events (cat 'kernel'): ProfilerActivity.CUDA missing, "
            "or CUPTI unavailable in this environment"
        )
    return problems


CUDA_FIGURES = ("max_allocated_mb", "allocated_mb", "reserved_mb", "max_reserved_mb")
CPU_FIGURES = ("rss_mb", "max_rss_mb")


def memory_problems(rows: list[dict], cuda: bool, steps: int) -> list[str]:
    """The per-step memory file: one row per step 0..steps-1, the device's figures positive, and
    on CUDA the peaks at least the current values and reserved at least allocated."""
    problems = []
    if [row.get("step") for row in rows] != list(range(steps)):
        problems.append(f"memory rows for steps {[row.get('step') for row in rows]}, not 0..{steps - 1}")
    figures = CUDA_FIGURES if cuda else CPU_FIGURES
    for row in rows:
        missing = [name for name in figures if not isinstance(row.get(name), (int, float))]
        if missing:
            problems.append(f"step {row.get('step')}: no {', '.join(missing)} in {row}")
            break
        if any(row[name] <= 0 for name in figures):
            problems.append(f"step {row.get('step')}: a figure is not positive: {row}")
            break
        if cuda and not (
            row["max_allocated_mb"] >= row["allocated_mb"]
            and row["max_reserved_mb"] >= row["reserved_mb"] >= row["allocated_mb"]
        ):
            problems.append(f"step {row.get('step')}: CUDA figures out of order: {row}")
            break
    return problems


# --- out of memory ------------------------------------------------------------------------------


def oom_check(dev: torch.device, work: Path, timeout_s: float = OOM_TIMEOUT_S) -> dict:
    if dev.type != "cuda":
        return {"skipped": "needs CUDA: the snapshot is of the CUDA caching allocator"}
    release_cached_memory(dev)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "oom"
    config = work / "oom_config.py"
    config.write_text(OOM_CONFIG.format(run_dir=str(run_dir)))
    fraction = OOM_CAP_BYTES / torch.cuda.get_device_properties(dev).total_memory
    run = run_child(["-c", OOM_PROGRAM, repr(fraction), str(config)], timeout_s, work / "oom.log")
    snapshot = run_dir / "profile" / "oom-snapshot-rank0.pickle"
    result: dict = {
        "allocator_cap_gib": OOM_CAP_BYTES / 2**30,
        "returncode": run.returncode,
        "run_seconds": round(run.seconds, 1),
        "train_steps_done": len(train_records(run_dir)),
    }
    problems = oom_exit_problems(run, snapshot)
    if snapshot.is_file():
        summary, snapshot_issues = snapshot_summary(snapshot)
        result["snapshot"] = summary
        problems += snapshot_issues
    return _verdict(result, problems, run)


def oom_exit_problems(run: ChildRun, snapshot: Path) -> list[str]:
    """The run must end as a user should see it: exit code 1 (an exception, not a crash or a
    hang), torch.OutOfMemoryError in the output, and the error's note naming the snapshot."""
    if run.timed_out:
        return ["the run did not end within its time limit (killed)"]
    problems = []
    if run.returncode != 1:
        problems.append(f"exit code {run.returncode}, expected 1 (an uncaught exception)")
    output = run.log.read_text(errors="replace") if run.log.is_file() else ""
    if "OutOfMemoryError" not in output or "CUDA out of memory" not in output:
        problems.append("no torch.OutOfMemoryError ('CUDA out of memory') in the run's output")
    if "CUDA memory snapshot at the error:" not in output or snapshot.name not in output:
        problems.append(f"the error's note does not name the snapshot {snapshot.name}")
    if not snapshot.is_file():
        problems.append(f"no snapshot file {snapshot}")
    return problems


def snapshot_summary(path: Path) -> tuple[dict, list[str]]:
    """Loads a memory snapshot (the pickle torch.cuda.memory._dump_snapshot writes) and says what
    it holds, with the problems that make it useless: not loadable, no segments, no history of
    allocations, no "oom" event (recording was not on when the error came)."""
    try:
        with open(path, "rb") as handle:
            snapshot = pickle.load(handle)  # noqa: S301 - the file this check's own run wrote
    except Exception as error:  # noqa: BLE001 - any failure to load is the finding
        return {}, [f"the snapshot does not load: {type(error).__name__}: {error}"]
    if not isinstance(snapshot, dict):
        return {}, [f"the snapshot is a {type(snapshot).__name__}, not a dict"]
    segments = snapshot.get("segments")
    traces = snapshot.get("device_traces")
    entries = [entry for trace in traces or [] for entry in trace]
    ooms = [entry for entry in entries if entry.get("action") == "oom"]
    framed = [entry for entry in entries if entry.get("frames")]
    listed = segments if isinstance(segments, list) else []
    summary = {
        "megabytes": round(path.stat().st_size / 2**20, 2),
        "segments": len(listed),
        "segment_bytes": sum(segment.get("total_size", 0) for segment in listed),
        "trace_entries": len(entries),
        "oom_events": len(ooms),
        "oom_requested_bytes": ooms[-1].get("size") if ooms else None,
        "entries_with_stacks": len(framed),
        "project_frames": any(
            "train_kernel" in str(frame.get("filename", "")) for entry in framed for frame in entry["frames"]
        ),
    }
    problems = []
    if not listed:
        problems.append("the snapshot has no segments")
    if not entries:
        problems.append("the snapshot has no allocation history (device_traces empty)")
    if not ooms:
        problems.append("the snapshot's history has no 'oom' event")
    if entries and not summary["project_frames"]:
        problems.append("no allocation in the history has a stack through train_kernel")
    return summary, problems


# --- shared -------------------------------------------------------------------------------------


def _run_problems(run: ChildRun, timeout_s: float) -> list[str]:
    if run.timed_out:
        return [f"the run did not end within {timeout_s} s (killed)"]
    return [] if run.returncode == 0 else [f"the run failed with exit code {run.returncode}"]


def _verdict(result: dict, problems: list[str], run: ChildRun) -> dict:
    result["ok"] = not problems
    if problems:
        result["problems"] = problems
        result["log_tail"] = run.tail()
    return result
