"""A tracking URI with credentials (issue 13, defect 15): the sidecar gets it through its
environment, MLflow gets the credentials through its own variables, and the secret appears in
no command line, log, run file, param, tag or artifact. Against the session's `mlflow server`,
behind a gate that lets only the right credentials through (tests.metrics.auth_gate)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from mlflow import MlflowClient

from metrics.emitter import MetricsEmitter
from metrics.mlflow_run import RUN_FILE
from metrics.sidecar import OFFSET_FILE
from metrics.supervisor import start_sidecar
from tests.metrics.auth_gate import AuthGate
from tests.metrics.helpers import append, has_run, history, run_id, start_record, train_record, wait_for


def _leaks(secret: str, run_dir: Path, uri: str) -> list[str]:
    """Where the secret shows: the files the sidecar writes, the MLflow run's params, tags and
    artifacts (metrics.jsonl and config.py are the trainer's)."""
    files = [run_dir / name for name in (RUN_FILE, OFFSET_FILE, "sidecar.log")]
    found = [p.name for p in files if p.is_file() and secret in p.read_text(errors="replace")]
    client = MlflowClient(uri)
    run = client.get_run(run_id(run_dir))
    found += [f"param {k}" for k, v in run.data.params.items() if secret in k + v]
    found += [f"tag {k}" for k, v in run.data.tags.items() if secret in k + v]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run.info.run_id, "", tmp))
        found += [f"artifact {p.name}" for p in local.rglob("*") if p.is_file() and secret in p.read_text()]
    return found


def test_password_in_the_uri_reaches_mlflow_and_nothing_else(mlflow_server, tmp_path):
    secret = f"pw-{uuid.uuid4().hex}"
    with AuthGate(mlflow_server.uri, "alice", secret, token="unused") as gate:
        uri = f"http://alice:{secret}@127.0.0.1:{gate.port}"
        # As an older trainer wrote it (the emitter now masks it): the config's URI in params.
        append(
            tmp_path,
            [start_record(0, "s", **{"metrics.mlflow_tracking_uri": uri}), *map(train_record, range(10))],
        )
        (tmp_path / "config.py").write_text(f"metrics = dict(mlflow_tracking_uri={uri!r})\n")
        sidecar = start_sidecar(tmp_path, uri)
        wait_for(lambda: has_run(tmp_path) and len(history(mlflow_server.uri, tmp_path, "loss")) == 10, 60)
        cmdline = Path(f"/proc/{sidecar.pid}/cmdline").read_bytes()
        assert sidecar.stop(timeout_s=60) == 0
        assert gate.passed > 0 and gate.refused == 0  # the credentials went with every request
    assert b"metrics.sidecar" in cmdline and secret.encode() not in cmdline
    assert (tmp_path / "sidecar.log").is_file() and (tmp_path / OFFSET_FILE).is_file()
    assert not _leaks(secret, tmp_path, mlflow_server.uri)
    run = MlflowClient(mlflow_server.uri).get_run(run_id(tmp_path))
    masked = f"http://alice:***@127.0.0.1:{gate.port}"
    assert run.data.params["metrics.mlflow_tracking_uri"] == masked
    assert f"at {masked}" in sidecar.log_file.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        config = MlflowClient(mlflow_server.uri).download_artifacts(run.info.run_id, "config.py", tmp)
        assert Path(config).read_text() == f"metrics = dict(mlflow_tracking_uri='{masked}')\n"


def test_token_in_the_query_string_is_sent_as_a_bearer_token(mlflow_server, tmp_path):
    token = f"tok-{uuid.uuid4().hex}"
    with AuthGate(mlflow_server.uri, "nobody", "none", token=token) as gate:
        uri = f"http://127.0.0.1:{gate.port}/?token={token}"
        append(tmp_path, [start_record(0, "s"), *map(train_record, range(5))])
        (tmp_path / "config.py").write_text("JOB_NAME = 'test'\n")
        result = subprocess.run(
            [sys.executable, "-m", "metrics.sidecar", "run", "--run-dir", str(tmp_path), "--once"],
            env={**os.environ, "MLFLOW_TRACKING_URI": uri},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert gate.passed > 0 and gate.refused == 0
        assert not any("token" in path for path in gate.paths)  # not in front of MLflow's API path
    assert [s for s, _ in history(mlflow_server.uri, tmp_path, "loss")] == list(range(5))
    artifacts = MlflowClient(mlflow_server.uri).list_artifacts(run_id(tmp_path))
    assert [a.path for a in artifacts] == ["config.py"]
    assert token not in result.stdout + result.stderr and not _leaks(token, tmp_path, mlflow_server.uri)
    assert json_uri(tmp_path) == f"http://127.0.0.1:{gate.port}/?token=***"


def json_uri(run_dir: Path) -> str:
    import json

    return json.loads((run_dir / RUN_FILE).read_text())["tracking_uri"]


def test_emitter_masks_credentials_in_params_records(tmp_path):
    emitter = MetricsEmitter(tmp_path)
    emitter.emit(
        "params",
        {
            "params": {
                "metrics.mlflow_tracking_uri": "http://bob:hunter2@mlflow:5000",
                "x": "s3://b/k?sig=abc",
            },
            "tags": {},
            "step": 0,
        },
    )
    emitter.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "hunter2" not in text and "abc" not in text
    assert "http://bob:***@mlflow:5000" in text and "s3://b/k?sig=***" in text
    assert f'"start_id":"{emitter.start_id}"' in text


def test_refused_credentials_are_waited_on_not_a_crash_and_nothing_is_skipped(mlflow_server, tmp_path):
    """401 is about the credentials, not the records: the sidecar waits (with backoff) instead of
    exiting or skipping; a stop then gives up after --drain-timeout-s, for the next start."""
    secret = f"wrong-{uuid.uuid4().hex}"
    with AuthGate(mlflow_server.uri, "alice", "right", token="unused") as gate:
        append(tmp_path, [start_record(0, "s"), *map(train_record, range(5))])
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "metrics.sidecar",
                "run",
                "--run-dir",
                str(tmp_path),
                "--drain-timeout-s",
                "1",
            ],
            env={**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:{secret}@127.0.0.1:{gate.port}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(lambda: gate.refused >= 3, timeout_s=60, what="retries")
        assert process.poll() is None
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    assert "401" in output and "skipped" not in output and secret not in output
