"""The metrics service's costs (issue 5), in one run:

- emit: the trainer's cost of one step record, MetricsEmitter.emit with a 30-field record like the
  trainer's (target <= 50 us per step);
- forward: step records per second from metrics.jsonl into a local `mlflow server` (SQLite store,
  one worker), `metrics-sidecar run --once` end to end (process start-up included), side by side
  with the limit: the MLflow server's own ingestion of the same metrics, sent by a bare loop of
  MlflowClient.log_batch calls of 1000 metrics (target >= 5000 records/s); best of 2 alternating
  rounds after a warm-up round;
- sidecar alone: the sidecar's reading, parsing and batching with the requests dropped (what it
  costs beside MLflow);
- lag: one record per second written by MetricsEmitter while a follow-mode sidecar (started with
  metrics.supervisor.start_sidecar, 0.2 s poll) forwards it; the time from the write to MLflow
  holding the step (seen by polling the run every 20 ms) (target <= 2 s).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import OUT, save_result
from metrics.mlflow_run import RUN_FILE

FORWARD_RECORDS = int(os.environ.get("BENCH_METRICS_RECORDS", "2000"))
EMIT_RECORDS = 20000
ROUNDS = 2
LAG_RECORDS = int(os.environ.get("BENCH_METRICS_LAG_RECORDS", "12"))


def step_record(step: int) -> dict:
    """The trainer's train record for one step (30 fields as in runs/demo/metrics.jsonl)."""
    loss = 6.0 - step * 1e-4
    return {
        "tflops": 0.306,
        "step": step,
        "loss": loss,
        "tgs": 3428.8,
        "lr": 1e-4,
        "loss_scale": 1.0,
        "grad_norm": {"0_default": 2.62},
        "micro_num": 2,
        "num_consumed_tokens": 2048 * (step + 1),
        "inf_nan_skip_batches": 0,
        "num_samples_in_batch": 4,
        "largest_length": 512,
        "largest_batch": 2,
        "smallest_batch": 2,
        "adam_beta2": 0.95,
        "fwd_bwd_time": 0.49,
        "acc": 0.3262,
        "perplexity": math.exp(loss),
        "acc/en": 0.0,
        "acc/code": 0.3262,
        "tokens/en": 0,
        "tokens/code": 2048,
        "loss_from_metric": loss,
        "loss/en": float("nan"),
        "loss/code": loss,
        "eta_s": 12.5,
        "data_wait_s": 0.000418,
    }


def bench_emit(folder: Path) -> float:
    from metrics.emitter import MetricsEmitter

    shutil.rmtree(folder, ignore_errors=True)
    emitter = MetricsEmitter(folder)
    records = [step_record(step) for step in range(EMIT_RECORDS)]
    rounds = []
    for _ in range(3):
        started = time.perf_counter()
        for record in records:
            emitter.emit("train", record)
        rounds.append((time.perf_counter() - started) / len(records) * 1e6)
    emitter.close()
    return min(rounds)


class Server:
    def __init__(self, folder: Path, port: int) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.uri = f"http://127.0.0.1:{port}"
        args = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.process = subprocess.Popen(
            args,
            stdout=open(folder / "server.log", "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mlflow server failed; see {folder / 'server.log'}") from None
                time.sleep(0.1)

    def close(self) -> None:
        os.killpg(self.process.pid, 15)
        self.process.wait()


def write_run(run_dir: Path, records: int) -> None:
    from metrics.emitter import MetricsEmitter

    shutil.rmtree(run_dir, ignore_errors=True)
    emitter = MetricsEmitter(run_dir)
    emitter.emit(
        "params",
        {
            "params": {"job_name": "bench", "data.total_steps": records},
            "tags": {"job_name": "bench", "world_size": 1},
        },
    )
    for step in range(records):
        emitter.emit("train", step_record(step))
    emitter.close()


def bench_forward(server: Server) -> dict:
    """Best of ROUNDS alternating rounds of the sidecar and the bare log_batch loop, after a warm-up
    round (a fresh server's first thousands of inserts are several times slower)."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    experiment = client.create_experiment("bench-limit")
    batches = None
    sidecar_s, limit_s = [], []
    for round_ in range(ROUNDS + 1):
        run_dir = OUT / f"metrics-run-{round_}"
        write_run(run_dir, FORWARD_RECORDS)
        batches = batches or run_metrics_batches(run_dir)
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "metrics.sidecar",
                "run",
                "--run-dir",
                str(run_dir),
                "--tracking-uri",
                server.uri,
                "--once",
            ],
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - started
        run_id = client.create_run(experiment).info.run_id
        started = time.perf_counter()
        for metrics in batches:
            client.log_batch(run_id, metrics=metrics)
        bare = time.perf_counter() - started
        print(
            f"round {round_}{' (warm-up)' if round_ == 0 else ''}: sidecar {seconds:.2f} s, "
            f"bare log_batch {bare:.2f} s",
            flush=True,
        )
        if round_:
            sidecar_s.append(seconds)
            limit_s.append(bare)
    return {
        "records": FORWARD_RECORDS,
        "metrics_per_record": sum(map(len, batches)) / FORWARD_RECORDS,
        "sidecar_s": min(sidecar_s),
        "limit_s": min(limit_s),
        "sidecar_records_per_s": FORWARD_RECORDS / min(sidecar_s),
        "limit_records_per_s": FORWARD_RECORDS / min(limit_s),
        "sidecar_over_limit": min(limit_s) / min(sidecar_s),
    }


def run_metrics_batches(run_dir: Path) -> list[list]:
    """The run's metrics (with the step sentinel the sidecar adds) in requests of at most 1000."""
    from mlflow.entities import Metric

    from metrics.records import JsonlReader, metrics_of

    flat = []
    for record in JsonlReader(run_dir / "metrics.jsonl").read(10**9):
        if record.kind == "train":
            ts = record.timestamp_ms
            flat += [Metric(k, v, ts, record.step) for k, v in metrics_of(record).items()]
            flat.append(Metric("sidecar/train_step", float(record.step), ts, record.step))
    return [flat[i : i + 1000] for i in range(0, len(flat), 1000)]


def bench_sidecar_alone() -> float:
    """Records/s through the sidecar's reading, parsing and batching, requests dropped."""
    from metrics.records import JsonlReader
    from metrics.sidecar import Sidecar

    class NullRun:
        def log_batch(self, metrics, params, tags) -> None:
            pass

    run_dir = OUT / "metrics-run-alone"
    write_run(run_dir, 20000)
    sidecar = Sidecar(run_dir, "unused")
    sidecar._last, sidecar._params = {"train": -1, "valid": -1}, {}
    reader = JsonlReader(run_dir / "metrics.jsonl")
    started = time.perf_counter()
    while records := reader.read(5000):
        sidecar._forward(NullRun(), records)
    return 20000 / (time.perf_counter() - started)


def bench_lag(server: Server) -> dict:
    from mlflow import MlflowClient

    from metrics.emitter import MetricsEmitter
    from metrics.supervisor import start_sidecar

    run_dir = OUT / "metrics-run-lag"
    shutil.rmtree(run_dir, ignore_errors=True)
    emitter = MetricsEmitter(run_dir)
    emitter.emit("params", {"params": {"job_name": "lag"}, "tags": {"job_name": "lag", "world_size": 1}})
    sidecar = start_sidecar(run_dir, server.uri)
    while "run_id" not in (info := _json_or_empty(run_dir / RUN_FILE)):
        time.sleep(0.05)
    client = MlflowClient(server.uri)
    rid = info["run_id"]
    written: dict[int, float] = {}
    seen: dict[int, float] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            metrics = client.get_run(rid).data.metrics
            if "sidecar/train_step" in metrics:
                last = int(metrics["sidecar/train_step"])
                now = time.time()
                for step in range(last + 1):
                    seen.setdefault(step, now)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(2)  # the sidecar has started and waits for records
    for step in range(LAG_RECORDS):
        written[step] = time.time()
        emitter.emit("train", step_record(step))
        time.sleep(1.0)
    done.set()
    poller.join()
    sidecar.stop()
    lags = [seen[s] - written[s] for s in written if s in seen]
    assert len(lags) == LAG_RECORDS, (len(lags), LAG_RECORDS)
    return {"records": LAG_RECORDS, "median_s": statistics.median(lags), "max_s": max(lags)}


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main() -> dict:
    result: dict = {"emit_us_per_record": bench_emit(OUT / "metrics-emit")}
    print(f"emit: {result['emit_us_per_record']:.1f} us per record", flush=True)
    result["sidecar_alone_records_per_s"] = bench_sidecar_alone()
    print(
        f"sidecar alone (requests dropped): {result['sidecar_alone_records_per_s']:.0f} records/s", flush=True
    )
    server = Server(OUT / "metrics-mlflow", 5931)
    try:
        result["forward"] = bench_forward(server)
        print(f"forward: {result['forward']}", flush=True)
        result["lag"] = bench_lag(server)
        print(f"lag: {result['lag']}", flush=True)
    finally:
        server.close()
    save_result("metrics", result)
    return result


if __name__ == "__main__":
    main()
