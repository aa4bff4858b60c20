"""The sidecar against a real MLflow server (the session's `mlflow_server`) and a sqlite:/// store:
every step arrives exactly once, across kills of the sidecar, restarts of the server and redone
steps of a resumed training run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from metrics.emitter import METRICS_FILE
from metrics.mlflow_run import project_git_commit
from metrics.supervisor import start_sidecar
from tests.metrics.helpers import (
    append,
    file_points,
    has_run,
    history,
    params_record,
    run_id,
    sidecar_cli,
    start_sidecar_once,
    train_record,
    valid_record,
    wait_for,
)


def test_records_params_tags_and_config_arrive(mlflow_server, tmp_path):
    long_value = "x" * 7000
    many = {f"extra.p{i:03d}": i for i in range(150)}  # over MLflow's 100 params per request
    append(tmp_path, [params_record(**many, long=long_value)])
    append(
        tmp_path,
        [train_record(step) for step in range(20)]
        + [valid_record(9), *map(train_record, range(20, 25)), valid_record(24)],
    )
    (tmp_path / "config.py").write_text("JOB_NAME = 'test'\n")
    result = sidecar_cli(
        "--run-dir",
        str(tmp_path),
        "--tracking-uri",
        mlflow_server.uri,
        "--experiment",
        "sidecar-tests",
        "--once",
    )
    assert result.returncode == 0, result.stderr

    uri = mlflow_server.uri
    assert history(uri, tmp_path, "loss") == sorted(file_points(tmp_path, "train", "loss").items())
    assert [s for s, _ in history(uri, tmp_path, "loss")] == list(range(25))
    assert history(uri, tmp_path, "grad_norm/0_default")[3] == (3, 1.03)
    assert history(uri, tmp_path, "val/loss") == [(9, 3.009), (24, 3.024)]
    assert "note" not in MlflowClient(uri).get_run(run_id(tmp_path)).data.metrics
    run = MlflowClient(uri).get_run(run_id(tmp_path))
    assert run.data.params["data.seq_len"] == "512" and run.data.params["extra.p149"] == "149"
    assert len(run.data.params["long"]) == 6000 and run.data.params["ckpt.load_ckpt_folder"] == "None"
    tags = run.data.tags
    assert tags["job_name"] == "test" and tags["world_size"] == "4"
    assert tags["parallel"] == "world=4 dp=2 pp=2 tp=1 zero1=1"
    if project_git_commit() is not None:
        assert tags["mlflow.source.git.commit"] == project_git_commit()
    assert [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)] == ["config.py"]
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "sidecar-tests"


@pytest.mark.process
def test_resumed_run_redone_steps_are_not_doubled(tmp_path):
    """Through a sqlite:/// store, as `make demo` logs (no server)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    append(run_dir, [params_record(), *map(train_record, range(30)), valid_record(29)])
    assert sidecar_cli("--run-dir", str(run_dir), "--tracking-uri", uri, "--once").returncode == 0
    first_id = run_id(run_dir)
    # The trainer resumes from the checkpoint of step 20: it redoes steps 20..29 (other values)
    # and its validation at 29, then goes on.
    append(
        run_dir,
        [
            params_record(**{"data.total_steps": 2000}),
            *(train_record(s, seed=0.5) for s in range(20, 40)),
            valid_record(29),
            valid_record(39),
        ],
    )
    result = sidecar_cli("--run-dir", str(run_dir), "--tracking-uri", uri, "--once")
    assert result.returncode == 0, result.stderr
    assert run_id(run_dir) == first_id
    loss = history(uri, run_dir, "loss")
    assert [s for s, _ in loss] == list(range(40))
    assert loss[25] == (25, 6.0 - 0.025) and loss[35] == (35, 6.5 - 0.035)
    assert loss == sorted(file_points(run_dir, "train", "loss").items())
    assert [s for s, _ in history(uri, run_dir, "val/loss")] == [29, 39]
    assert "changed params" in result.stderr and "data.total_steps: '1000' -> '2000'" in result.stderr
    assert (tmp_path / "mlruns").is_dir()


@pytest.mark.process
def test_stop_right_after_start_still_drains(tmp_path):
    """A run with nothing left to train stops its sidecar at once, while the sidecar is still
    importing: the stop must be held until its handler is in place, not kill it unforwarded."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    append(run_dir, [params_record(), *map(train_record, range(5))])
    sidecar = start_sidecar(run_dir, uri)
    assert sidecar.stop(timeout_s=120) == 0, (run_dir / "sidecar.log").read_text()
    assert [s for s, _ in history(uri, run_dir, "loss")] == list(range(5))


def test_partial_and_malformed_lines_and_sigterm_drains(mlflow_server, tmp_path):
    append(tmp_path, [params_record(), train_record(0)], text='garbage\n{"kind":"train","step":1,')
    sidecar = start_sidecar(tmp_path, mlflow_server.uri)
    wait_for(lambda: has_run(tmp_path) and history(mlflow_server.uri, tmp_path, "loss"), what="step 0")
    time.sleep(0.5)  # the partial line is waited for, not an error
    assert sidecar.poll() is None
    append(tmp_path, [], text='"loss":7.5}\n')
    append(tmp_path, [train_record(step) for step in range(2, 200)])
    assert sidecar.stop(timeout_s=60) == 0  # drains the 198 records written just before
    assert [s for s, _ in history(mlflow_server.uri, tmp_path, "loss")] == list(range(200))
    assert history(mlflow_server.uri, tmp_path, "loss")[1] == (1, 7.5)
    log = sidecar.log_file.read_text()
    assert f"{METRICS_FILE}:3: not a metrics record (garbage)" in log


class Writer(threading.Thread):
    """A trainer appending records every few milliseconds, with a resume (redone steps) midway."""

    def __init__(self, run_dir, steps: int, resume_at: int, redo_from: int, period_s: float = 0.004) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.steps, self.resume_at, self.redo_from, self.period_s = (
            run_dir,
            steps,
            resume_at,
            redo_from,
            period_s,
        )
        self.written = 0

    def run(self) -> None:
        append(self.run_dir, [params_record()])
        plan = list(range(self.resume_at)) + list(range(self.redo_from, self.steps))
        for i, step in enumerate(plan):
            if i == self.resume_at:
                append(self.run_dir, [params_record()])
            append(self.run_dir, [train_record(step, seed=0.25 if i >= self.resume_at else 0.0)])
            if step % 50 == 49:
                append(self.run_dir, [valid_record(step)])
            self.written = i + 1
            time.sleep(self.period_s)


def test_kill_9_sidecar_and_restart_server_mid_run(mlflow_server, tmp_path):
    writer = Writer(tmp_path, steps=400, resume_at=250, redo_from=200)
    writer.start()
    sidecar = start_sidecar(tmp_path, mlflow_server.uri)
    wait_for(lambda: writer.written > 100, what="the writer")
    wait_for(
        lambda: has_run(tmp_path) and len(history(mlflow_server.uri, tmp_path, "loss")) > 20,
        what="first steps",
    )
    sidecar.process.kill()  # SIGKILL, mid-run
    sidecar.process.wait()
    sidecar = start_sidecar(tmp_path, mlflow_server.uri)
    wait_for(lambda: writer.written > 280, what="the writer")
    mlflow_server.stop()  # as a crash would; the sidecar retries with backoff while the writer goes on
    writer.join(timeout=60)
    time.sleep(0.5)
    mlflow_server.start()
    assert sidecar.stop(timeout_s=60) == 0
    assert history(mlflow_server.uri, tmp_path, "loss") == sorted(
        file_points(tmp_path, "train", "loss").items()
    )
    assert [s for s, _ in history(mlflow_server.uri, tmp_path, "sidecar/train_step")] == list(range(400))
    assert [s for s, _ in history(mlflow_server.uri, tmp_path, "val/loss")] == list(range(49, 400, 50))
    assert "failed" in sidecar.log_file.read_text()  # it did see the server go away


def test_tracking_server_down_at_start_then_up(mlflow_server, tmp_path):
    append(tmp_path, [params_record(), *map(train_record, range(10))])
    mlflow_server.stop()
    try:
        process = start_sidecar_once(tmp_path, mlflow_server.uri)
        time.sleep(1.5)
        assert process.poll() is None  # waiting, with backoff
    finally:
        mlflow_server.start()
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "retry" in output
    assert [s for s, _ in history(mlflow_server.uri, tmp_path, "loss")] == list(range(10))


@pytest.mark.process
def test_missing_run_folder_is_a_clear_error(tmp_path):
    result = sidecar_cli(
        "--run-dir", str(tmp_path / "nope"), "--tracking-uri", "http://127.0.0.1:9", "--once"
    )
    assert result.returncode != 0
    assert f"run folder {tmp_path / 'nope'} does not exist" in result.stderr
    with pytest.raises(FileNotFoundError, match="nope"):
        start_sidecar(tmp_path / "nope", "http://127.0.0.1:9")


def test_one_sidecar_per_run_folder(mlflow_server, tmp_path):
    """A restarted trainer's sidecar waits while the previous one still drains the folder."""
    append(tmp_path, [params_record(), *map(train_record, range(5))])
    first = start_sidecar(tmp_path, mlflow_server.uri)
    wait_for(lambda: has_run(tmp_path) and history(mlflow_server.uri, tmp_path, "loss"), what="step 0")
    second = start_sidecar_once(tmp_path, mlflow_server.uri)
    append(
        tmp_path, [train_record(step, seed=0.5 if step < 5 else 0.0) for step in range(3, 10)]
    )  # resumed at 3
    time.sleep(2)
    assert second.poll() is None
    assert first.stop() == 0
    output, _ = second.communicate(timeout=60)
    assert second.returncode == 0 and "waiting for it to finish" in output, output
    assert history(mlflow_server.uri, tmp_path, "loss") == sorted(
        file_points(tmp_path, "train", "loss").items()
    )
    assert [s for s, _ in history(mlflow_server.uri, tmp_path, "loss")] == list(range(10))


@pytest.mark.process
def test_stop_gives_up_when_mlflow_stays_down(tmp_path):
    append(tmp_path, [params_record(), train_record(0)])
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metrics.sidecar",
            "run",
            "--run-dir",
            str(tmp_path),
            "--tracking-uri",
            "http://127.0.0.1:9",
            "--drain-timeout-s",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: (tmp_path / "mlflow_run.json").exists(), what="the sidecar to start")
    process.terminate()
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 1, output
    assert "stopped while MLflow was unreachable" in output and "resumes where MLflow's data ends" in output


def test_sidecar_drains_and_exits_when_the_trainer_dies(mlflow_server, tmp_path):
    trainer = (
        "import sys, time\nfrom pathlib import Path\nfrom metrics.supervisor import start_sidecar\n"
        "s = start_sidecar(Path(sys.argv[1]), sys.argv[2])\nprint(s.pid, flush=True)\ntime.sleep(600)\n"
    )
    append(tmp_path, [params_record(), *map(train_record, range(5))])
    process = subprocess.Popen(
        [sys.executable, "-c", trainer, str(tmp_path), mlflow_server.uri], stdout=subprocess.PIPE, text=True
    )
    sidecar_pid = int(process.stdout.readline())
    wait_for(lambda: has_run(tmp_path) and history(mlflow_server.uri, tmp_path, "loss"), what="step 0")
    append(tmp_path, [train_record(s) for s in range(5, 50)])
    process.kill()  # the trainer dies without stopping its sidecar
    process.wait()
    wait_for(lambda: not _alive(sidecar_pid), timeout_s=30, what="the sidecar to exit")
    assert [s for s, _ in history(mlflow_server.uri, tmp_path, "loss")] == list(range(50))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped by its dead parent's successor yet) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
