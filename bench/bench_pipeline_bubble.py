"""Pipeline bubble on this CPU: how long each stage sits blocked in point-to-point communication
during a training step, next to the schedule's theoretical bubble.

Real gloo processes (pipeline size = processes = 2 and 4, data 1), a small fp32 InternLM, micro_num m
in {4, 8}, for the project's 1F1B schedule and its interleaved one (v = 2 chunks per stage;
pipeline.schedule = "InternLM": bench_pipeline_engines.py sets PyTorch's engine beside them). Theory:
1F1B (p-1)/(m+p-1), interleaved (p-1)/(v*m+p-1).

Instrumentation, from outside the trainer (nothing in train_kernel is edited): each rank runs this
file's rank program, which swaps the `dist` name of the two schedule modules for a proxy of
torch.distributed whose batch_isend_irecv / isend / irecv return Work objects whose wait() is timed
(receives and sends apart), and wraps the forward_backward of the project's step schedules
(train/step_schedule.py) and the loop's step to time them. Per step and rank:
- idle = time blocked in wait() of p2p receives + sends inside the forward/backward schedule;
- bubble_fraction = 1 - busy / window, busy = the rank's schedule time - idle, window = first schedule
  start to last schedule end over all stages in that step (perf_counter is CLOCK_MONOTONIC, one clock
  for all processes here): the quantity the theory describes, the same window for every stage (a
  later stage's wait for the first activation and an earlier stage's finish before the last
  backward of the step count as bubble);
- idle_fraction = idle / the rank's own schedule time (p2p blocking only; lower than bubble_fraction
  on the later stages, whose schedule starts late and ends early);
- idle_fraction_of_step = idle / whole step (which adds the optimizer and its collectives).
Medians over the steps after WARMUP. Sends are counted too: 1F1B posts a stage's send and receive
together and waits on both, and a gloo send of this size completes only once the peer receives.

Caveat: with 4 processes on a 2-core machine, two stages share each core, so compute is inflated and
a stage's "idle" overlaps with its core neighbour's compute; the 4-process numbers say more about the
schedule's ordering under contention than about a real 4-device pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import types
from pathlib import Path

from bench.common import OUT, ROOT, save_result

SHAPE = {
    "hidden": int(os.environ.get("BENCH_BUBBLE_HIDDEN", "256")),
    "layers": 8,
    "heads": 8,
    "seq_len": int(os.environ.get("BENCH_BUBBLE_SEQ", "512")),
    "vocab": 1024,  # small, so the last stage's head does not unbalance the stages much
}
PROCESSES = [int(p) for p in os.environ.get("BENCH_BUBBLE_PROCESSES", "2,4").split(",")]
MICRO_NUMS = [int(m) for m in os.environ.get("BENCH_BUBBLE_MICRO_NUMS", "4,8").split(",")]
CHUNKS = 2
WARMUP = 2
STEPS = int(os.environ.get("BENCH_BUBBLE_STEPS", "4"))

CONFIG = """
JOB_NAME = "bubble"
data = dict(seq_len={seq_len}, micro_num={micro_num}, micro_bsz=1, total_steps={steps})
adam = dict(lr=1e-4)
model = dict(num_layers={layers}, hidden_size={hidden}, num_attention_heads={heads}, mlp_ratio=8 / 3,
             vocab_size={vocab}, dtype="torch.float32", embed_grad_scale=1, checkpoint=False,
             num_chunks={chunks})
parallel = dict(zero1=1, pipeline=dict(size={pipeline}, interleaved_overlap=True, schedule="InternLM"))
run_dir = {run_dir!r}
"""


# ---------------------------------------------------------------- rank program (one per process)


class _Timings:
    def __init__(self) -> None:
        self.recv = 0.0
        self.send = 0.0
        self.steps: list[dict] = []


class _TimedWork:
    """A p2p Work whose wait() adds its blocked time to the rank's receive or send total."""

    def __init__(self, work, kind: str, timings: _Timings) -> None:
        self._work, self._kind, self._timings = work, kind, timings

    def wait(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            if self._kind == "recv":
                self._timings.recv += elapsed
            else:
                self._timings.send += elapsed

    def __getattr__(self, name):
        return getattr(self._work, name)


def _timed_dist(timings: _Timings, wrap_single: bool):
    """A stand-in for the torch.distributed module: p2p calls return timed Works, the rest is the
    real module. The 1F1B module passes isend/irecv to P2POp, which accepts only the real ones, so
    there (wrap_single False) only batch_isend_irecv is wrapped; the interleaved module calls
    isend/irecv directly (wrap_single True)."""
    import torch.distributed as dist

    proxy = types.ModuleType("timed_dist")
    proxy.__getattr__ = lambda name: getattr(dist, name)  # type: ignore[attr-defined]

    def batch_isend_irecv(ops):
        kinds = ["recv" if op.op is dist.irecv else "send" for op in ops]
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(kinds):  # a coalescing backend answers with fewer Works than ops
            kinds = ["recv" if "recv" in kinds else "send"] * len(works)
        return [_TimedWork(w, k, timings) for w, k in zip(works, kinds)]

    proxy.batch_isend_irecv = batch_isend_irecv
    if wrap_single:
        proxy.isend = lambda *a, **k: _TimedWork(dist.isend(*a, **k), "send", timings)
        proxy.irecv = lambda *a, **k: _TimedWork(dist.irecv(*a, **k), "recv", timings)
    return proxy


def _rank_program(config_path: str, out_path: str) -> None:
    from train_kernel.parallel import interleaved_schedule, pipeline_schedule
    from train_kernel.train import loop, step_schedule

    timings = _Timings()
    pipeline_schedule.dist = _timed_dist(timings, wrap_single=False)
    interleaved_schedule.dist = _timed_dist(timings, wrap_single=True)
    current: dict = {}

    def timed_schedule(function):
        def wrapper(*args, **kwargs):
            recv0, send0 = timings.recv, timings.send
            started = time.perf_counter()
            result = function(*args, **kwargs)
            ended = time.perf_counter()
            current.update(
                schedule_start=started,
                schedule_end=ended,
                schedule_s=ended - started,
                recv_wait_s=timings.recv - recv0,
                send_wait_s=timings.send - send0,
            )
            return result

        return wrapper

    for schedule in (step_schedule.ProjectPipeline, step_schedule.ProjectInterleaved):
        schedule.forward_backward = timed_schedule(schedule.forward_backward)
    train_step = loop.TrainLoop.train_step

    def timed_train_step(self, *args, **kwargs):
        current.clear()
        started = time.perf_counter()
        train_step(self, *args, **kwargs)
        timings.steps.append({**current, "step_s": time.perf_counter() - started})

    loop.TrainLoop.train_step = timed_train_step
    from train_kernel.cli import main

    main(["run", "--launcher", "torch", "--config", config_path], standalone_mode=False)
    Path(out_path).write_text(json.dumps({"rank": int(os.environ["RANK"]), "steps": timings.steps}))


# ---------------------------------------------------------------- driver


def theory(p: int, m: int, v: int) -> float:
    return (p - 1) / (v * m + p - 1)


def _median(steps: list[dict], value) -> float:
    return statistics.median(value(s) for s in steps)


def run_case(processes: int, micro_num: int, chunks: int) -> dict:
    from tests.train_kernel.parallel.launch import run_ranks

    name = f"bubble-p{processes}-m{micro_num}-v{chunks}"
    run_dir = OUT / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "config.py"
    config.write_text(
        CONFIG.format(
            steps=WARMUP + STEPS,
            micro_num=micro_num,
            chunks=chunks,
            pipeline=processes,
            run_dir=str(run_dir / "run"),
            **SHAPE,
        )
    )
    results = run_ranks(
        [
            "-m",
            "bench.bench_pipeline_bubble",
            "--rank-program",
            str(config),
            str(run_dir / "timings-{rank}.json"),
        ],
        processes,
        timeout=900,
        extra_env={"PYTHONPATH": str(ROOT)},
    )
    for result in results:
        if result.returncode != 0:
            raise RuntimeError(f"{name} rank {result.rank} failed:\n{result.output[-4000:]}")
    per_rank = [
        json.loads((run_dir / f"timings-{rank}.json").read_text())["steps"][WARMUP:]
        for rank in range(processes)
    ]
    # The common window of each step: first schedule start to last schedule end over all stages
    # (perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine).
    windows = [
        max(r[i]["schedule_end"] for r in per_rank) - min(r[i]["schedule_start"] for r in per_rank)
        for i in range(len(per_rank[0]))
    ]
    stages = []
    for rank, steps in enumerate(per_rank):
        stages.append(
            {
                "stage": rank,
                "schedule_s": round(_median(steps, lambda s: s["schedule_s"]), 4),
                "step_s": round(_median(steps, lambda s: s["step_s"]), 4),
                "recv_wait_s": round(_median(steps, lambda s: s["recv_wait_s"]), 4),
                "send_wait_s": round(_median(steps, lambda s: s["send_wait_s"]), 4),
                "idle_fraction": round(
                    _median(steps, lambda s: (s["recv_wait_s"] + s["send_wait_s"]) / s["schedule_s"]), 4
                ),
                "recv_idle_fraction": round(_median(steps, lambda s: s["recv_wait_s"] / s["schedule_s"]), 4),
                "bubble_fraction": round(
                    statistics.median(
                        1 - (s["schedule_s"] - s["recv_wait_s"] - s["send_wait_s"]) / w
                        for s, w in zip(steps, windows)
                    ),
                    4,
                ),
                "idle_fraction_of_step": round(
                    _median(steps, lambda s: (s["recv_wait_s"] + s["send_wait_s"]) / s["step_s"]), 4
                ),
            }
        )
    shutil.rmtree(run_dir / "run", ignore_errors=True)
    return {
        "processes": processes,
        "pipeline": processes,
        "schedule": "1F1B" if chunks == 1 else f"interleaved v={chunks}",
        "micro_num": micro_num,
        "chunks": chunks,
        "theoretical_bubble": round(theory(processes, micro_num, chunks), 4),
        "mean_bubble_fraction": round(statistics.mean(s["bubble_fraction"] for s in stages), 4),
        "mean_idle_fraction": round(statistics.mean(s["idle_fraction"] for s in stages), 4),
        "window_s": round(statistics.median(windows), 4),
        "stages": stages,
        "cores_shared": processes > (os.cpu_count() or 1),
    }


def main() -> dict:
    cases = []
    for processes in PROCESSES:
        for micro_num in MICRO_NUMS:
            for chunks in (1, CHUNKS):
                if chunks > 1 and micro_num % processes:
                    continue
                started = time.perf_counter()
                case = run_case(processes, micro_num, chunks)
                case["wall_s"] = round(time.perf_counter() - started, 1)
                cases.append(case)
                print(
                    f"p={processes} m={micro_num} {case['schedule']:>15}: "
                    f"theory {case['theoretical_bubble']:.3f}, "
                    f"bubble per stage {[s['bubble_fraction'] for s in case['stages']]}, "
                    f"p2p idle in own schedule {[s['idle_fraction'] for s in case['stages']]} "
                    f"({case['wall_s']} s)",
                    file=sys.stderr,
                    flush=True,
                )
    result = {
        "shape": SHAPE,
        "dtype": "fp32",
        "micro_bsz": 1,
        "data": 1,
        "warmup_steps": WARMUP,
        "measured_steps": STEPS,
        "threads_per_rank": 1,
        "note": (
            f"{os.cpu_count()} CPU cores: with more processes than cores (4 processes here) stages share "
            "cores, so compute is inflated and idle time partly overlaps a neighbour's compute on the same "
            "core; the machine is also shared with other work, so single cases are noisy (medians over "
            "measured_steps). bubble_fraction = 1 - (own schedule time - p2p wait) / common window (first "
            "schedule start to last schedule end over the stages); idle_fraction = blocked in p2p Work.wait "
            "(recv + send) / own schedule time; theoretical_bubble = (p-1)/(m+p-1) for 1F1B, (p-1)/(v*m+p-1) "
            "interleaved"
        ),
        "cases": cases,
    }
    save_result("pipeline_bubble", result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rank-program":
        _rank_program(sys.argv[2], sys.argv[3].format(rank=os.environ["RANK"]))
    else:
        main()
