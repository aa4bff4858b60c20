"""The prepared GPU check's new sections (bench/gpu_check_health.py, bench/gpu_check_tensor.py) and
the out-of-memory snapshot hook, on CPU: what reads a trace, a memory file, a snapshot and a run's
records; the sections' dry run (profiling on CPU, tensor parallelism on gloo); and the snapshot hook's
control flow. Only the GPU check itself shows that CUDA's allocator, CUPTI and NCCL do their part."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from bench import gpu_check, gpu_check_tensor
from bench.cli_runs import ChildRun
from bench.gpu_check_health import (
    memory_problems,
    oom_exit_problems,
    snapshot_summary,
    trace_problems,
    trace_summary,
)
from bench.gpu_check_tensor import compare_records, one_rank_problems
from train_kernel.health import profiling
from train_kernel.health.profiling import StepProfiler, oom_snapshot, snapshot_path

FRAMES = [{"filename": "/src/train_kernel/model/layers.py", "line": 40, "name": "forward"}]


def _snapshot(**changes) -> dict:
    """A snapshot as torch.cuda.memory._snapshot() lays it out (fields the check reads)."""
    snapshot = {
        "segments": [{"address": 1 << 30, "total_size": 2 << 20, "blocks": [], "device": 0}],
        "device_traces": [
            [
                {"action": "alloc", "addr": 1 << 30, "size": 512, "stream": 0, "frames": FRAMES},
                {"action": "oom", "size": 3 << 30, "device_free": 1 << 20, "stream": 0, "frames": FRAMES},
            ]
        ],
    }
    snapshot.update(changes)
    return snapshot


def _write(path, value) -> None:
    with open(path, "wb") as handle:
        pickle.dump(value, handle)


def test_snapshot_summary_reads_a_snapshot_and_names_what_is_missing(tmp_path):
    good = tmp_path / "good.pickle"
    _write(good, _snapshot())
    summary, problems = snapshot_summary(good)
    assert problems == []
    assert summary["segments"] == 1 and summary["oom_events"] == 1 and summary["project_frames"]
    assert summary["oom_requested_bytes"] == 3 << 30

    no_oom = tmp_path / "no_oom.pickle"
    _write(no_oom, _snapshot(device_traces=[[_snapshot()["device_traces"][0][0]]]))
    assert snapshot_summary(no_oom)[1] == ["the snapshot's history has no 'oom' event"]

    no_history = tmp_path / "no_history.pickle"
    _write(no_history, _snapshot(segments=[], device_traces=[[]]))
    problems = snapshot_summary(no_history)[1]
    assert "the snapshot has no segments" in problems and any("no allocation history" in p for p in problems)

    torn = tmp_path / "torn.pickle"
    torn.write_bytes(good.read_bytes()[:20])
    assert snapshot_summary(torn)[1][0].startswith("the snapshot does not load")


def test_trace_and_memory_checks_on_a_real_cpu_profile(tmp_path):
    profiler = StepProfiler(tmp_path, rank=0, device=torch.device("cpu"), first=1, last=2)
    weight = torch.randn(64, 64)
    for step in range(4):
        profiler.start(step)
        (weight @ weight).sum()
        profiler.end(step)
    profiler.close()
    summary = trace_summary(tmp_path / "profile" / "trace-rank0-steps1-2.json")
    assert summary["cpu_ops"] > 0 and summary["cuda_kernels"] == 0
    assert trace_problems(summary, cuda=False) == []
    assert "no CUDA kernel events" in trace_problems(summary, cuda=True)[0]
    memory = (tmp_path / "profile" / "memory-rank0.jsonl").read_text()
    rows = [json.loads(line) for line in memory.splitlines()]
    assert memory_problems(rows, cuda=False, steps=4) == []
    assert "no max_allocated_mb" in memory_problems(rows, cuda=True, steps=4)[0]
    assert "not 0..4" in memory_problems(rows[1:], cuda=False, steps=5)[0]
    figures = {"max_allocated_mb": 90.0, "allocated_mb": 50.0, "reserved_mb": 100.0, "max_reserved_mb": 100.0}
    cuda_rows = [{"step": 0, **figures}]
    assert memory_problems(cuda_rows, cuda=True, steps=1) == []
    cuda_rows[0]["reserved_mb"] = 40.0  # reserved below allocated: the figures are wrong
    assert "out of order" in memory_problems(cuda_rows, cuda=True, steps=1)[0]


def test_oom_exit_problems(tmp_path):
    snapshot = tmp_path / "profile" / "oom-snapshot-rank0.pickle"
    snapshot.parent.mkdir()
    _write(snapshot, _snapshot())
    log = tmp_path / "oom.log"
    log.write_text(
        "Traceback (most recent call last):\n...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to "
        f"allocate 1.00 GiB.\nrank 0: CUDA memory snapshot at the error: {snapshot} (open it at ...)\n"
    )
    assert oom_exit_problems(ChildRun(1, 3.0, log), snapshot) == []
    assert "exit code 0" in oom_exit_problems(ChildRun(0, 3.0, log), snapshot)[0]
    assert oom_exit_problems(ChildRun(None, 150.0, log), snapshot) == [
        "the run did not end within its time limit (killed)"
    ]
    log.write_text("RuntimeError: CUDA error: an illegal memory access was encountered\n")
    assert len(oom_exit_problems(ChildRun(1, 3.0, log), snapshot)) == 2


def test_compare_records_and_one_rank_limits():
    norm = {"0_default": 1.0}
    rows = [
        {"step": s, "loss": 6.9 - s / 10, "grad_norm": norm, "num_consumed_tokens": 64 * (s + 1)}
        for s in range(3)
    ]
    assert compare_records(rows, [dict(r) for r in rows], 1e-5) == (0.0, [])
    off = [dict(r) for r in rows]
    off[2] = {**off[2], "loss": off[2]["loss"] * (1 + 1e-3)}
    worst, problems = compare_records(rows, off, 1e-5)
    assert worst == pytest.approx(1e-3) and len(problems) == 1 and problems[0].startswith("step 2: loss")
    off[2] = {**off[2], "loss": float("nan")}
    assert compare_records(rows, off, 1e-5)[1][0].startswith("step 2: loss nan")
    case = {"same_parameter_names": True, "gradients": 21, "plain_gradients": 21}
    case.update(loss=1.0, plain_loss=1.0)
    report = {
        f"{dtype}_{name}": {**case, "rel_loss_diff": 0.0, "max_rel_grad_diff": 1e-6}
        for dtype in ("float32", "bfloat16")
        for name in ("tensor1", "tensor1_sequence_parallel")
    }
    assert one_rank_problems(report) == []
    report["float32_tensor1"]["max_rel_grad_diff"] = 0.5
    assert one_rank_problems(report) == ["float32 tensor1: gradients differ by 0.5 (relative to the largest)"]


def test_oom_snapshot_does_nothing_on_cpu(tmp_path):
    # On this CPU-only torch every torch.cuda.memory call raises: the block's own error comes out as is.
    with pytest.raises(ValueError, match="not memory") as error:
        with oom_snapshot(tmp_path, 0, enabled=True):
            raise ValueError("not memory")
    assert not getattr(error.value, "__notes__", None)
    assert not (tmp_path / "profile").exists()


def test_oom_snapshot_control_flow(tmp_path, monkeypatch):
    """With CUDA present (its memory functions replaced by recorders, since no GPU is here): history
    on before the block, the snapshot written at torch.OutOfMemoryError and named in a note on the
    re-raised error, history off after it; without --profiling only the hint."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def record(*args, **kwargs):
        calls.append(("record", kwargs))

    def dump(name):
        calls.append(("dump", name))
        _write(name, _snapshot())

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    with pytest.raises(torch.OutOfMemoryError) as error:
        with oom_snapshot(tmp_path, 3, enabled=True):
            calls.append(("body", None))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    path = snapshot_path(tmp_path, 3)
    assert path == tmp_path / "profile" / "oom-snapshot-rank3.pickle"
    assert calls == [
        ("record", {"max_entries": profiling.HISTORY_ENTRIES, "stacks": "python"}),
        ("body", None),
        ("dump", str(path)),
        ("record", {"enabled": None}),
    ]
    assert error.value.__notes__ == [
        f"rank 3: CUDA memory snapshot at the error: {path} (open it at {profiling.MEMORY_VIZ})"
    ]
    assert snapshot_summary(path)[1] == []

    calls.clear()
    with oom_snapshot(tmp_path, 0, enabled=True):  # a run that ends well: history off, no snapshot
        pass
    assert [name for name, _ in calls] == ["record", "record"]
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError) as error:
        with oom_snapshot(tmp_path, 0, enabled=False):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert calls == [] and "train-kernel run --profiling" in error.value.__notes__[0]


@pytest.mark.process
def test_dry_run_profiling_and_oom_sections(tmp_path):
    """`gpu_check --tiny --only profiling,oom` on CPU: the profiling run through the CLI passes its
    CPU checks, oom says it needs CUDA, and gpu_check.json holds both."""
    args = gpu_check.parse_args(["--tiny"])
    dev = gpu_check.device()  # the trainer's device: CPU here (on a GPU machine, the real check)
    sections = gpu_check.build_sections(args, dev, tmp_path / "work")
    result = gpu_check.run_checks(sections, ["profiling", "oom"], {}, [tmp_path / "out"])
    assert result["profiling"]["ok"], result["profiling"]
    assert result["profiling"]["train_steps"] == 5 and result["profiling"]["trace"]["cpu_ops"] > 0
    if dev.type == "cpu":
        assert result["oom"]["skipped"].startswith("needs CUDA")
    else:
        assert result["oom"]["ok"], result["oom"]
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()).keys() == {"profiling", "oom"}
    assert gpu_check.summary_lines(result)[0] == "profiling: pass"


@pytest.mark.process
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; with CUDA the GPU check runs it")
def test_dry_run_tensor_parallel_section(tmp_path, monkeypatch):
    """The tensor-parallel section on CPU: the one-rank program on gloo, and tensor 2 with sequence
    parallelism on 2 gloo ranks through the CLI against one process (one variant: time)."""
    variant = gpu_check_tensor.VARIANTS["tensor2_sequence_parallel"]
    monkeypatch.setattr(gpu_check_tensor, "VARIANTS", {"sp": variant})
    result = gpu_check_tensor.tensor_parallel_check(torch.device("cpu"), tmp_path, tiny=True)
    assert result["ok"], result
    assert result["one_rank"]["backend"] == "gloo"
    two = result["two_ranks"]
    assert two["single"]["steps"] == two["sp"]["steps"] == 4
    assert two["sp"]["max_rel_loss_diff"] <= 1e-5 and two["sp"]["step_time_over_single"] > 0
