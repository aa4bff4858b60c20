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
    train(config_from_text(config_text(run_dir, extra=extra + f"ckpt['load_ckpt_folder'] = 'local:{run_dir}/ckpt/2'\n")))
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
