"""Whole training runs of a tiny model with faults injected: a non-finite streak and a loss spike
roll back to the last checkpoint and the run finishes all its steps (a resume skips the same
batches); a crash sends a crash alert; a hung rank of a 2-rank job makes both ranks write their
stacks and exit promptly; --profiling writes a trace. Alerts go to a real local HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.train_kernel.health.webhook import Webhook
from tests.train_kernel.parallel.launch import train_ranks
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import config_from_text
from train_kernel.health.watchdog import HANG_EXIT_CODE
from train_kernel.train.trainer import train


def _records(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _config(run_dir, extra: str, **overrides) -> str:
    values = dict(total_steps=10, save=True, checkpoint_every=4, oss_snapshot_freq=0)
    values.update(overrides)
    return tiny_config_text(run_dir, **values) + extra


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def _titles(webhook) -> list[str]:
    return [body["content"]["post"]["zh_cn"]["title"] for body in webhook.received if "content" in body]


@pytest.mark.process
def test_nonfinite_streak_rolls_back_and_the_run_finishes(tmp_path, webhook):
    run_dir = tmp_path / "run"
    text = _config(
        run_dir,
        "health = dict(max_consecutive_skips=2, profile_steps=(1, 2))\n"
        "fault_injection = dict(nonfinite_grad_at_steps=[5, 6])\n"
        f"monitor = dict(alert=dict(enable_feishu_alert=True, feishu_alert_address={webhook.url!r}, "
        f"alert_file_path={str(tmp_path / 'alerts.jsonl')!r}, "
        f"light_monitor_address='127.0.0.1:{webhook.server.server_address[1]}/heartbeat'))\n",
    )
    (tmp_path / "cfg.py").write_text(text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train_kernel.cli",
            "run",
            "--profiling",
            "--config",
            str(tmp_path / "cfg.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAULT INJECTION ON: non-finite gradients at steps [5, 6]" in result.stdout
    steps = [r["step"] for r in _records(run_dir)]
    # steps 5 and 6 skipped -> rollback to checkpoint 4 -> steps 4.. again on new batches, to the end
    assert steps == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]
    (event,) = _records(run_dir, "event")
    assert event["event"] == "rollback" and event["step"] == 6
    assert event["rollback"] == {"number": 1, "to_step": 4, "skipped_batches": 3}
    assert "2 consecutive steps skipped" in event["reason"]
    (rollback,) = json.loads((run_dir / "health" / "rollbacks.json").read_text())["rollbacks"]
    assert (rollback["first_batch"], rollback["end_batch"]) == (4, 7)
    assert _records(run_dir)[-1]["inf_nan_skip_batches"] == 0  # the checkpoint's count, then clean steps
    webhook.wait_for(5)
    beats = [body for body, path in zip(webhook.received, webhook.paths) if path == "/heartbeat"]
    assert beats and all(b["msg_type"] == "train_metrics" and "loss" in b for b in beats)
    titles = _titles(webhook)
    assert titles == [
        "[tiny] start at step 0",
        "[tiny] nonfinite_streak at step 6",
        "[tiny] rollback at step 6",
        "[tiny] finish at step 10",
    ], titles
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert kinds == ["start", "nonfinite_streak", "rollback", "finish"]
    # --profiling: a Chrome trace of steps 1..2 and one memory line per step trained
    trace = json.loads((run_dir / "profile" / "trace-rank0-steps1-2.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    memory = (run_dir / "profile" / "memory-rank0.jsonl").read_text().splitlines()
    assert len(memory) == len(steps)


def test_loss_spike_rolls_back_and_a_resume_skips_the_same_batches(tmp_path):
    run_dir = tmp_path / "run"
    spike = "health = dict(loss_spike=dict(factor=3, window=3, steps=1))\n"
    text = _config(run_dir, spike + "fault_injection = dict(loss_spike_at_steps=[5])\n", total_steps=8)
    train(config_from_text(text))
    log = (run_dir / "train.log").read_text()
    assert "alert loss_spike: step 5: loss spike: loss" in log
    records = _records(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]
    (event,) = _records(run_dir, "event")
    assert event["reason"].startswith("loss spike: loss") and event["rollback"]["skipped_batches"] == 2
    assert records[6]["loss"] != records[4]["loss"]  # step 4 again, on the batch after the window
    # A new start from checkpoint 4 in the same run folder skips the recorded window too: it
    # trains exactly what the run trained after its rollback.
    resumed = text.replace(
        "auto_resume=False",
        f"auto_resume=False, load_ckpt_info=dict(path='local:{run_dir}/ckpt/4', content=('all',))",
    )
    train(config_from_text(resumed.replace("loss_spike_at_steps=[5]", "")))
    log = (run_dir / "train.log").read_text()[len(log) :]
    assert "1 earlier rollback(s) of this run" in log
    assert "skipping batch 4 " in log and "skipping batch 5 " in log
    again = _records(run_dir)[len(records) :]
    assert [r["step"] for r in again] == [4, 5, 6, 7]
    assert [r["loss"] for r in again] == [r["loss"] for r in records[6:]]


def test_rollbacks_are_bounded_and_need_a_checkpoint(tmp_path):
    spike = "health = dict(loss_spike=dict(factor=3, window=3, steps=1), max_rollbacks=1)\n"
    text = _config(
        tmp_path / "a", spike + "fault_injection = dict(loss_spike_at_steps=[5, 6])\n", total_steps=8
    )
    with pytest.raises(RuntimeError, match=r"already rolled back 1 time\(s\) \(health.max_rollbacks = 1"):
        train(config_from_text(text))
    text = _config(tmp_path / "b", spike + "fault_injection = dict(loss_spike_at_steps=[4])\n", save=False)
    with pytest.raises(RuntimeError, match="no complete checkpoint at or before step 4"):
        train(config_from_text(text))


@pytest.mark.process
def test_crash_sends_a_crash_alert(tmp_path, webhook):
    text = _config(
        tmp_path / "run",
        "fault_injection = dict(raise_at_step=2)\nhealth = dict(alert_format='json')\n"
        f"monitor = dict(alert=dict(enable_feishu_alert=True, feishu_alert_address={webhook.url!r}))\n",
        save=False,
    )
    (tmp_path / "cfg.py").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "train_kernel.cli", "run", "--config", str(tmp_path / "cfg.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert [body["kind"] for body in webhook.wait_for(2)] == ["start", "crash"]
    crash = webhook.received[1]
    assert "InjectedFault: fault injection: raise_at_step=2" in crash["message"] and crash["step"] is None


@pytest.mark.distributed
def test_hung_rank_makes_both_ranks_dump_stacks_and_exit(tmp_path, webhook):
    run_dir = tmp_path / "run"
    text = _config(
        run_dir,
        "health = dict(hang_timeout_s=3, hang_exit_grace_s=20)\n"
        "data.update(empty_cache_and_diag_interval=1)\n"
        "fault_injection = dict(hang_at_step=3, hang_rank=1)\n"
        f"monitor = dict(alert=dict(enable_feishu_alert=True, feishu_alert_address={webhook.url!r}))\n",
        total_steps=100,
        save=False,
    ).replace("zero1=1", "zero1=-1")
    (tmp_path / "cfg.py").write_text(text)
    started = time.monotonic()
    results = train_ranks(tmp_path / "cfg.py", world_size=2, timeout=120)
    elapsed = time.monotonic() - started
    assert [r.returncode for r in results] == [HANG_EXIT_CODE] * 2, results[0].output[-3000:]
    assert elapsed < 60  # the collectives' own timeout is 30 minutes
    assert "step 0: step time per rank (s): " in results[0].output  # both ranks' times, on rank 0
    hung = (run_dir / "health" / "stacks-rank1.txt").read_text()
    waiting = (run_dir / "health" / "stacks-rank0.txt").read_text()
    assert "since step 3 began" in hung and "in before_step" in hung and "Thread MainThread" in hung
    assert "since step 3 began" in waiting and "in train_step" in waiting  # waiting in a collective
    hang = [body for body in webhook.wait_for(2) if "hang" in body["content"]["post"]["zh_cn"]["title"]]
    assert (
        len(hang) == 1 and "no step progress" in hang[0]["content"]["post"]["zh_cn"]["content"][0][0]["text"]
    )


@pytest.mark.distributed
def test_two_ranks_with_zero_roll_back_together(tmp_path):
    run_dir = tmp_path / "run"
    text = _config(
        run_dir,
        "health = dict(max_consecutive_skips=1)\nfault_injection = dict(nonfinite_grad_at_steps=[5])\n",
        total_steps=8,
    ).replace("zero1=1", "zero1=-1")  # ZeRO-1 over both ranks, overlapped parameter broadcast
    (tmp_path / "cfg.py").write_text(text)
    results = train_ranks(tmp_path / "cfg.py", world_size=2, timeout=180)
    assert [r.returncode for r in results] == [0, 0], results[1].output[-3000:]
    assert [r["step"] for r in _records(run_dir)] == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]
    (event,) = _records(run_dir, "event")
    assert event["rollback"] == {"number": 1, "to_step": 4, "skipped_batches": 2}
    # every rank decided it from the same figures (rank 1 logs warnings only)
    assert all("rollback 1 of at most 3 at step 5" in r.output for r in results)
