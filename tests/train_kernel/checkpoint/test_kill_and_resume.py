"""A trainer killed with SIGKILL in the middle of a run, restarted with auto_resume, produces the
same losses step for step as a run never interrupted (fp32, bit-identical on CPU), data order
included; and SIGTERM / the stop file save a checkpoint before the run exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train_kernel.checkpoint.helpers import config_text, losses_by_step, train_records
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train

STEPS = 40
SIZES = {"total_steps": STEPS, "checkpoint_every": 5, "seq_len": 128, "micro_bsz": 4, "valid_every": 0}


def _start(config_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "train_kernel.cli", "run", "--config", str(config_file)],
        stdout=open(tmp_path / f"out-{time.monotonic_ns()}.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_for(path, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"trainer exited with {process.returncode} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.005)


@pytest.mark.process
@pytest.mark.parametrize("upload", ["sync", pytest.param("async", marks=pytest.mark.server)])
def test_sigkill_then_auto_resume_matches_an_uninterrupted_run(tmp_path, upload):
    reference = tmp_path / "reference"
    train(config_from_text(config_text(reference, **SIZES)))
    run_dir = tmp_path / "killed"
    config_file = tmp_path / "killed.py"
    extra = "\nckpt['auto_resume'] = True\nckpt['oss_snapshot_freq'] = 0\n"
    if upload == "async":  # the private uploader dies with the trainer; the next one finishes its journal
        extra += (
            f"ckpt['async_upload'] = True\nckpt['async_upload_tmp_folder'] = {str(tmp_path / 'spool')!r}\n"
        )
    config_file.write_text(config_text(run_dir, extra=extra, **SIZES))
    process = _start(config_file, tmp_path)
    _wait_for(run_dir / "ckpt" / "10" / "10.step", process)
    while max(losses_by_step(run_dir)) < 11:  # past the checkpoint: these steps will be redone
        assert process.poll() is None
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(losses_by_step(run_dir))
    assert killed_at < STEPS - 1, "the trainer finished before it was killed: make the steps slower"
    restarted = _start(config_file, tmp_path)
    assert restarted.wait(timeout=120) == 0
    want, got = losses_by_step(reference), losses_by_step(run_dir)
    assert sorted(got) == list(range(STEPS))
    for step, values in got.items():
        # Steps after the checkpoint it resumed from were trained twice: both times identically.
        assert set(values) == set(want[step]), step
    assert any(len(values) == 2 for values in got.values()), "no step was redone after the resume"


@pytest.mark.process
def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    run_dir = tmp_path / "run"
    config_file = tmp_path / "run.py"
    config_file.write_text(config_text(run_dir, **{**SIZES, "checkpoint_every": 1000}))
    process = _start(config_file, tmp_path)
    while not (run_dir / "metrics.jsonl").exists() or len(train_records(run_dir)) < 3:
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    last = train_records(run_dir)[-1]["step"] + 1
    assert last < STEPS
    assert (run_dir / "ckpt" / str(last) / f"{last}.step").exists()


def test_stop_file_saves_and_stops_or_saves_and_goes_on(tmp_path):
    stop_file = tmp_path / "stop"
    stop_file.write_text("-2\n")  # InternLM's negative number: save after step 2, keep going
    run_dir = tmp_path / "run"
    text = config_text(
        run_dir,
        extra=f"\nckpt['stop_file_path'] = {str(stop_file)!r}\n",
        checkpoint_every=1000,
        total_steps=6,
    )
    config = config_from_text(text)
    train(config)
    assert (run_dir / "ckpt" / "2" / "2.step").exists()
    assert len(train_records(run_dir)) == 6
    stop_file.write_text("stop 3\n")
    second = tmp_path / "second"
    try:
        train(config_from_text(text.replace(str(run_dir), str(second))))
    except SystemExit:
        raise AssertionError("a stop-file stop is a clean end, not a signal exit") from None
    assert [r["step"] for r in train_records(second)] == [0, 1, 2]
    assert (second / "ckpt" / "3" / "3.step").exists()


@pytest.mark.server
def test_a_private_uploader_killed_mid_run_is_restarted_and_no_checkpoint_is_lost(tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    config_file = tmp_path / "run.py"
    extra = (
        f"\nckpt['async_upload'] = True\nckpt['async_upload_tmp_folder'] = {str(tmp_path / 'spool')!r}\n"
        "ckpt['oss_snapshot_freq'] = 0\n"
    )
    config_file.write_text(config_text(run_dir, extra=extra, **SIZES))
    process = _start(config_file, tmp_path)
    _wait_for(run_dir / "ckpt" / "5" / "5.step", process)
    uploaders = [
        child
        for child in psutil.Process(process.pid).children()
        if "ckpt_uploader" in " ".join(child.cmdline())
    ]
    assert len(uploaders) == 1
    uploaders[0].kill()
    assert process.wait(timeout=120) == 0
    for step in range(5, STEPS + 1, 5):
        folder = run_dir / "ckpt" / str(step)
        assert (folder / f"{step}.step").exists(), step
        manifest = (folder / "manifest.json").read_text()
        assert f'"step": {step}' in manifest
    log = "".join(p.read_text() for p in tmp_path.glob("out-*.log"))
    assert "starting a new one" in log
