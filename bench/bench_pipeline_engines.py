"""The project's pipeline schedules against PyTorch's pipelining engine, side by side in one run.

Real gloo processes (pipeline size = processes = 2, data 1, one thread each on this 2-core machine),
a small fp32 InternLM (hidden 256, 8 layers, seq 512, micro_num 8), the same config but for
`parallel.pipeline.schedule`:

- 1F1B: the project's (schedule "InternLM", num_chunks 1) and PyTorch's Schedule1F1B;
- interleaved (num_chunks 2): the project's and PyTorch's ScheduleInterleaved1F1B, and PyTorch's
  ScheduleInterleavedZeroBubble.

Each variant trains WARMUP + STEPS steps; the figure is the median of the log line's
`fwd_bwd_time` (forwards and backwards of the step, what a schedule changes) over the steps after
warm-up, and the step's wall time from metrics.jsonl. The variants run in alternating rounds so
that the machine's load touches all of them alike; the table gives each one's median over rounds
and its ratio to the project's schedule of the same kind.

    python -m bench.bench_pipeline_engines
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys

from bench.common import OUT, ROOT, save_result

SHAPE = {"hidden": 256, "layers": 8, "heads": 8, "seq_len": 512, "vocab": 1024}
MICRO_NUM = int(os.environ.get("BENCH_ENGINES_MICRO_NUM", "8"))
WARMUP, STEPS = 2, int(os.environ.get("BENCH_ENGINES_STEPS", "6"))
ROUNDS = int(os.environ.get("BENCH_ENGINES_ROUNDS", "2"))
PROCESSES = 2
VARIANTS = [  # (name, num_chunks, pipeline.schedule)
    ("project 1F1B", 1, "InternLM"),
    ("PyTorch Schedule1F1B", 1, "1F1B"),
    ("project interleaved", 2, "InternLM"),
    ("PyTorch ScheduleInterleaved1F1B", 2, "Interleaved1F1B"),
    ("PyTorch ScheduleInterleavedZeroBubble", 2, "InterleavedZeroBubble"),
]

CONFIG = """
JOB_NAME = "engines"
data = dict(seq_len={seq_len}, micro_num={micro_num}, micro_bsz=1, total_steps={steps})
adam = dict(lr=1e-4)
model = dict(num_layers={layers}, hidden_size={hidden}, num_attention_heads={heads}, mlp_ratio=8 / 3,
             vocab_size={vocab}, dtype="torch.float32", embed_grad_scale=1, checkpoint=False,
             num_chunks={chunks})
parallel = dict(zero1=1, pipeline=dict(size={pipeline}, interleaved_overlap=True, schedule={schedule!r}))
run_dir = {run_dir!r}
"""


def run_variant(name: str, chunks: int, schedule: str | None, round_index: int) -> dict:
    from tests.train_kernel.parallel.launch import run_ranks

    slug = name.lower().replace(" ", "-")
    folder = OUT / "engines" / f"{slug}-{round_index}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = folder / "config.py"
    config.write_text(
        CONFIG.format(
            steps=WARMUP + STEPS,
            micro_num=MICRO_NUM,
            chunks=chunks,
            pipeline=PROCESSES,
            schedule=schedule,
            run_dir=str(folder / "run"),
            **SHAPE,
        )
    )
    results = run_ranks(
        ["-m", "train_kernel.cli", "run", "--config", str(config), "--launcher", "torch"],
        PROCESSES,
        timeout=900,
        extra_env={"PYTHONPATH": str(ROOT)},
    )
    for result in results:
        if result.returncode != 0:
            raise RuntimeError(f"{name} rank {result.rank} failed:\n{result.output[-4000:]}")
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"][WARMUP:]
    times = [r["time"] for r in records if r["kind"] == "train"]
    walls = [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1 :])]
    return {
        "fwd_bwd_s": statistics.median(r["fwd_bwd_time"] for r in train),
        "step_wall_s": statistics.median(walls) if walls else None,
        "loss_last": train[-1]["loss"],
    }


def main() -> dict:
    rounds: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
    for round_index in range(ROUNDS):
        for name, chunks, schedule in VARIANTS:
            rounds[name].append(run_variant(name, chunks, schedule, round_index))
            print(f"round {round_index} {name}: {rounds[name][-1]}", file=sys.stderr, flush=True)
    table = {}
    for name, _, _ in VARIANTS:
        table[name] = {
            "fwd_bwd_s": statistics.median(r["fwd_bwd_s"] for r in rounds[name]),
            "step_wall_s": statistics.median(r["step_wall_s"] for r in rounds[name]),
            "rounds": rounds[name],
        }
    for name, chunks, _ in VARIANTS:
        base = table["project 1F1B" if chunks == 1 else "project interleaved"]["fwd_bwd_s"]
        table[name]["fwd_bwd_vs_project"] = round(table[name]["fwd_bwd_s"] / base, 3)
    result = {
        "shape": SHAPE,
        "micro_num": MICRO_NUM,
        "processes": PROCESSES,
        "steps": STEPS,
        "rounds": ROUNDS,
        "variants": table,
    }
    save_result("pipeline_engines", result)
    for name in table:
        row = table[name]
        print(
            f"{name:40s} fwd_bwd {row['fwd_bwd_s']:.3f} s  x{row['fwd_bwd_vs_project']:.3f}  "
            f"wall {row['step_wall_s']:.3f} s"
        )
    return result


if __name__ == "__main__":
    main()
