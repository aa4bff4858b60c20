"""The trainer with its metrics sidecar (config `metrics = dict(mlflow_tracking_uri=...)`) against a
real `mlflow server`: every step arrives, and a run resumed from a checkpoint continues the same
MLflow run; the steps it redoes are neither doubled nor overwritten."""

from __future__ import annotations

from mlflow import MlflowClient

from tests.metrics.helpers import run_id
from tests.train_kernel.checkpoint.helpers import config_text, train_records
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train


def test_resumed_training_continues_the_same_mlflow_run(mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    extra = f"\nmetrics = dict(mlflow_tracking_uri={mlflow_server.uri!r}, experiment='trainer-tests')\n"
    train(config_from_text(config_text(run_dir, extra=extra)))
    first_id = run_id(run_dir)
    # Resume from step 2 into the same run folder: steps 2..5 are trained again.
    train(
        config_from_text(
            config_text(run_dir, extra=extra + f"ckpt['load_ckpt_folder'] = 'local:{run_dir}/ckpt/2'\n")
        )
    )
    assert run_id(run_dir) == first_id
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(first_id, "loss")
    assert sorted(m.step for m in history) == list(range(6))  # each step once
    first_values = {r["step"]: r["loss"] for r in train_records(run_dir)[:6]}
    assert {m.step: m.value for m in history} == first_values
    run = client.get_run(first_id)
    assert run.data.params["data.total_steps"] == "6"
    assert run.data.tags["job_name"] == "tiny"
    assert run.info.status == "FINISHED"


def test_a_sidecar_killed_mid_run_is_restarted_and_mlflow_gets_every_step_once(mlflow_server, tmp_path):
    import os
    import subprocess
    import sys
    import time

    import psutil

    steps = 40
    run_dir = tmp_path / "run"
    config_file = tmp_path / "run.py"
    extra = f"\nmetrics = dict(mlflow_tracking_uri={mlflow_server.uri!r}, experiment='trainer-tests')\n"
    config_file.write_text(
        config_text(run_dir, extra=extra, total_steps=steps, seq_len=128, micro_bsz=4, save=False)
    )
    with open(tmp_path / "trainer.log", "w") as log:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "train_kernel.cli", "run", "--config", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    deadline = time.monotonic() + 60
    while not (run_dir / "metrics.jsonl").exists() or len(train_records(run_dir)) < 5:
        assert trainer.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    sidecars = [
        c for c in psutil.Process(trainer.pid).children() if "metrics.sidecar" in " ".join(c.cmdline())
    ]
    assert len(sidecars) == 1
    sidecars[0].kill()
    assert trainer.wait(timeout=120) == 0
    assert "the sidecar had exited" in (tmp_path / "trainer.log").read_text()
    history = MlflowClient(mlflow_server.uri).get_metric_history(run_id(run_dir), "loss")
    assert sorted(m.step for m in history) == list(range(steps))
