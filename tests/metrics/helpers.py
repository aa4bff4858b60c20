"""Records as the trainer writes them, and reading back what MLflow holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from metrics.emitter import METRICS_FILE
from metrics.mlflow_run import RUN_FILE

PARAMS = {
    "job_name": "test",
    "data.seq_len": 512,
    "data.total_steps": 1000,
    "model.dtype": "torch.bfloat16",
    "parallel.zero1": 1,
    "parallel.pipeline.size": 2,
    "parallel.tensor.size": 1,
    "ckpt.load_ckpt_folder": None,
}


def params_record(**extra) -> dict:
    return {
        "kind": "params",
        "time": time.time(),
        "params": {**PARAMS, **extra},
        "tags": {"job_name": "test", "world_size": 4},
    }


def train_record(step: int, seed: float = 0.0) -> dict:
    """A train record with the log line's fields (about 30), values depending on step and seed."""
    loss = 6.0 - step * 0.001 + seed
    return {
        "kind": "train",
        "time": round(1.8e9 + step + seed, 3),
        "step": step,
        "tflops": 0.31,
        "loss": loss,
        "tgs": 3428.8,
        "lr": 1e-4 * (1 + step % 7),
        "loss_scale": 1.0,
        "grad_norm": {"0_default": 1.0 + step / 100},
        "micro_num": 2,
        "num_consumed_tokens": 2048 * (step + 1),
        "inf_nan_skip_batches": 0,
        "num_samples_in_batch": 4,
        "largest_length": 512,
        "largest_batch": 2,
        "smallest_batch": 2,
        "adam_beta2": 0.95,
        "fwd_bwd_time": 0.49,
        "acc": 0.3,
        "perplexity": math.exp(min(loss, 20)),
        "acc/en": 0.0,
        "acc/code": 0.33,
        "tokens/en": 0,
        "tokens/code": 2048,
        "loss_from_metric": loss,
        "loss/en": float("nan"),
        "loss/code": loss,
        "eta_s": 10.0,
        "data_wait_s": 0.0004,
        "note": "text fields are not metrics",
    }


def valid_record(step: int) -> dict:
    return {
        "kind": "valid",
        "time": round(1.8e9 + step + 0.5, 3),
        "step": step,
        "val/loss": 3.0 + step / 1000,
        "val/acc": 0.2,
    }


def append(run_dir: Path, records: list, text: str = "") -> None:
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
        handle.write(text)
        handle.flush()


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / RUN_FILE).read_text())["run_id"]


def has_run(run_dir: Path) -> bool:
    try:
        return "run_id" in json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False


def history(uri: str, run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point MLflow holds for the key, in step order."""
    from mlflow import MlflowClient

    points = MlflowClient(uri).get_metric_history(run_id(run_dir), key)
    return sorted((m.step, m.value) for m in points)


def file_points(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    """What MLflow should hold: per step, the value of the first record of that step (a redone
    step's record is not forwarded)."""
    points: dict[int, float] = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == kind and key in record and record["step"] > max(points, default=-1):
            points[record["step"]] = record[key]
    return points


def sidecar_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metrics.sidecar", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def start_sidecar_once(run_dir: Path, tracking_uri: str) -> subprocess.Popen:
    """`metrics-sidecar run --once` on `run_dir` as a background process, output piped."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metrics.sidecar",
            "run",
            "--run-dir",
            str(run_dir),
            "--tracking-uri",
            tracking_uri,
            "--once",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, timeout_s: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_record(step: int, start_id: str | None = None, **extra) -> dict:
    """The params record of a trainer start: `step` 0 when it loaded nothing (a fresh run), the
    checkpoint's step when it resumed; `start_id` as the emitter writes it (None: an older trainer)."""
    record = {**params_record(**extra), "step": step}
    if start_id is not None:
        record["start_id"] = start_id
    return record


def folder_runs(uri: str, run_dir: Path) -> list:
    """Every MLflow run the sidecar made for this run folder (tag `run_dir`), oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.run_dir = '{run_dir.resolve()}'")
    return sorted(runs, key=lambda run: run.info.start_time)


def run_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))
