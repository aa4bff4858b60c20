"""Real training runs with async checkpoints to S3 through a fault-injecting proxy in front of
moto's server (tests/fault_proxy.py): S3 errors of every kind on every operation, an outage that
ends, an outage that outlasts the deadline, and SIGTERM while uploads wait. Training never crashes
or hangs because of an upload, every checkpoint that is reported complete is, the marker comes
last, and auto_resume never takes an incomplete one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.train_kernel.checkpoint.helpers import config_text, losses_by_step, train_records
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train

pytestmark = pytest.mark.server


@pytest.fixture
def faulty_s3(s3_server, fault_proxy, monkeypatch):
    """This process (the trainer) and its private uploader reach S3 only through the proxy."""
    for key, value in fault_proxy.env.items():
        monkeypatch.setenv(key, value)
    for key in ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY_ID", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    bucket = s3_server.make_bucket(f"faults-{uuid.uuid4().hex[:8]}")
    return s3_server, fault_proxy, bucket


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    train(config_from_text(config_text(run_dir)))
    return run_dir


def _async_config(run_dir, folder, spool, extra: str = "") -> str:
    return config_text(
        run_dir,
        save_folder=folder,
        extra=(
            f"\nckpt['async_upload'] = True\nckpt['async_upload_tmp_folder'] = {str(spool)!r}\n"
            "ckpt['oss_snapshot_freq'] = 0\n" + extra
        ),
    )


def _keys(server, bucket: str, prefix: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"][len(prefix) :] for item in listing.get("Contents", []))


def _assert_complete(server, bucket: str, prefix: str, step: int) -> None:
    """The marker is there, every file the manifest lists is there with its size, none is newer."""
    s3 = server.client()
    folder = f"{prefix}/{step}/"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=folder + "manifest.json")["Body"].read())
    marker = s3.head_object(Bucket=bucket, Key=f"{folder}{step}.step")
    for entry in manifest["files"]:
        head = s3.head_object(Bucket=bucket, Key=folder + entry["name"])
        assert head["ContentLength"] == entry["size"], entry
        assert head["LastModified"] <= marker["LastModified"]


def test_s3_errors_of_every_kind_on_every_call_do_not_stop_training(tmp_path, faulty_s3, reference):
    server, proxy, bucket = faulty_s3
    # One call in six of every operation (its first included) fails, in turn with 503, SlowDown,
    # 500, 429 and a reset.
    proxy.set(every=6, faults=["503", "slowdown", "500", "throttle", "drop"])
    run_dir = tmp_path / "run"
    train(config_from_text(_async_config(run_dir, f"boto3:s3://{bucket}/run", tmp_path / "spool")))
    for step in (2, 4, 6):
        _assert_complete(server, bucket, "run", step)
    failed = proxy.stats()["failed"]
    for op in ("head_bucket", "head_object", "list", "put"):
        assert op in failed, (op, failed)
    assert losses_by_step(run_dir) == losses_by_step(reference)


def test_an_outage_during_training_delays_uploads_and_training_goes_on(tmp_path, faulty_s3, capfd):
    server, proxy, bucket = faulty_s3
    proxy.set(outage=True, paths=["run/4/", "run/6/"])  # the store is out for checkpoints 4 and 6
    run_dir = tmp_path / "run"
    ended: list[float] = []

    def end_the_outage_once_training_is_done() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            records = train_records(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            # The uploader has met the outage and tried again (only its retries list the
            # multipart uploads left under the folder).
            if len(records) == 6 and proxy.failed("list_uploads") >= 1:
                break
            time.sleep(0.05)
        ended.append(time.time())
        proxy.set()

    watcher = threading.Thread(target=end_the_outage_once_training_is_done, daemon=True)
    watcher.start()
    extra = "uploader = dict(retry_attempts=2)\n"
    train(config_from_text(_async_config(run_dir, f"boto3:s3://{bucket}/run", tmp_path / "spool", extra)))
    watcher.join(5)
    for step in (2, 4, 6):
        _assert_complete(server, bucket, "run", step)
    # Every step was trained while the outage lasted; only the end of the run waited for it.
    assert ended and max(r["time"] for r in train_records(run_dir)) <= ended[0]
    assert "store unavailable" in capfd.readouterr().err


def test_an_outage_past_the_deadline_fails_that_upload_and_resume_skips_it(
    tmp_path, faulty_s3, reference, capfd
):
    server, proxy, bucket = faulty_s3
    proxy.set(outage=True, paths=["run/6/"])
    folder = f"boto3:s3://{bucket}/run"
    extra = "uploader = dict(retry_attempts=2, outage_deadline_s=1)\n"
    train(config_from_text(_async_config(tmp_path / "first", folder, tmp_path / "spool", extra)))
    captured = capfd.readouterr()
    out = captured.out + captured.err
    assert "FAILED" in out and "gave up after an outage of 1 s" in out, out[-3000:]
    for step in (2, 4):
        _assert_complete(server, bucket, "run", step)
    assert "6.step" not in _keys(server, bucket, "run/6/")
    proxy.set()
    resumed = tmp_path / "resumed"
    train(
        config_from_text(_async_config(resumed, folder, tmp_path / "spool2", "ckpt['auto_resume'] = True\n"))
    )
    assert [r["step"] for r in train_records(resumed)] == [4, 5]
    want = losses_by_step(reference)
    for step, values in losses_by_step(resumed).items():
        assert values == want[step]


@pytest.mark.process
def test_sigterm_with_uploads_held_up_waits_a_bounded_time_reports_and_loses_nothing(tmp_path, faulty_s3):
    server, proxy, bucket = faulty_s3
    steps = 40
    folder = f"boto3:s3://{bucket}/run"
    spool = tmp_path / "spool"
    run_dir = tmp_path / "run"
    config_file = tmp_path / "run.py"
    text = config_text(
        run_dir,
        save_folder=folder,
        total_steps=steps,
        checkpoint_every=1000,
        seq_len=128,
        micro_bsz=4,
        extra=(
            f"\nckpt['async_upload'] = True\nckpt['async_upload_tmp_folder'] = {str(spool)!r}\n"
            "ckpt['oss_snapshot_freq'] = 0\nckpt['auto_resume'] = True\n"
            "uploader = dict(retry_attempts=2, exit_wait_s=3)\n"
        ),
    )
    config_file.write_text(text)
    proxy.set(outage=True, ops=["put", "put_part", "create_multipart", "complete"])  # reads work: it starts
    log = tmp_path / "first.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "train_kernel.cli", "run", "--config", str(config_file)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    while not (run_dir / "metrics.jsonl").exists() or len(train_records(run_dir)) < 3:
        assert process.poll() is None, log.read_text()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    waited = time.monotonic() - started
    saved = train_records(run_dir)[-1]["step"] + 1
    text_out = log.read_text()
    assert "not finished after 3 s" in text_out, text_out[-3000:]
    assert f"step{saved}-" in text_out and "the next run of this job does that" in text_out
    assert waited < 30, waited
    assert f"{saved}.step" not in _keys(server, bucket, f"run/{saved}/")
    # The next run's private uploader finishes the job from its journal, and resumes from it.
    proxy.set()
    restarted = subprocess.run(
        [sys.executable, "-m", "train_kernel.cli", "run", "--config", str(config_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    _assert_complete(server, bucket, "run", saved)
    steps_seen = [r["step"] for r in train_records(run_dir)]
    assert steps_seen[steps_seen.index(saved - 1) + 1] == saved  # resumed right after the SIGTERM save
