"""Alerts against a real local HTTP server: Feishu's message format, plain JSON, the alert file,
heartbeats, bounded retries, and a dead or stalled webhook that never holds up the caller."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.train_kernel.health.webhook import Webhook
from train_kernel.health.alerts import PLAIN_JSON, AlertSender


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def test_feishu_format_and_alert_file(webhook, tmp_path):
    sender = AlertSender("job7", rank=0, webhook=webhook.url, alert_file=tmp_path / "alerts" / "a.jsonl")
    sender.alert("rollback", "reloaded step 10", step=12, checkpoint="local:/x/10")
    assert sender.flush(10)
    (body,) = webhook.wait_for(1)
    assert body["msg_type"] == "post"
    post = body["content"]["post"]["zh_cn"]
    assert post["title"] == "[job7] rollback at step 12"
    (paragraph,) = post["content"]
    assert paragraph[0]["tag"] == "text"
    assert "reloaded step 10" in paragraph[0]["text"] and "checkpoint=local:/x/10" in paragraph[0]["text"]
    assert isinstance(body["timestamp"], int)
    assert webhook.content_types == "application/json;charset=utf-8"
    (line,) = (tmp_path / "alerts" / "a.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (
        record["kind"] == "rollback"
        and record["step"] == 12
        and record["fields"]["checkpoint"] == "local:/x/10"
    )
    sender.close()


def test_plain_json_webhook(webhook):
    sender = AlertSender("job", rank=3, webhook=webhook.url, webhook_format=PLAIN_JSON)
    sender.alert("crash", "RuntimeError: boom", step=4)
    sender.close(10)
    (body,) = webhook.wait_for(1)
    assert body["kind"] == "crash" and body["message"] == "RuntimeError: boom"
    assert body["rank"] == 3 and body["step"] == 4 and body["job_name"] == "job"
    assert body["host"] == socket.gethostname()


def test_heartbeat_is_internlm_light_monitor_message(webhook, monkeypatch):
    monkeypatch.setenv("CLUSTER_NAME", "c1")
    sender = AlertSender("job", heartbeat_url=webhook.url)
    sender.heartbeat({"loss": 2.5, "grad_norm": {"0_default": 1.5}, "acc/en": float("nan"), "step": 3})
    sender.close(10)
    (body,) = webhook.wait_for(1)
    assert body == {
        "loss": 2.5,
        "grad_norm_0_default": 1.5,
        "acc_en": None,
        "step": 3,
        "cluster": "c1",
        "msg_type": "train_metrics",
    }


def test_retries_are_bounded_then_succeed():
    hook = Webhook(fail_first=2)
    try:
        sender = AlertSender("job", webhook=hook.url, attempts=3, backoff_s=0.01)
        sender.alert("finish", "done")
        assert sender.flush(10)
        assert hook.requests == 3 and len(hook.received) == 1 and sender.failed == 0
        hook.requests, hook.fail_first = 0, 100
        sender.alert("finish", "again")
        assert sender.flush(10)
        assert hook.requests == 3 and sender.failed == 1  # three attempts, then given up
    finally:
        hook.close()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def test_down_webhook_never_blocks_and_file_still_written(tmp_path):
    sender = AlertSender("job", webhook=_closed_port_url(), alert_file=tmp_path / "a.jsonl", backoff_s=0.01)
    started = time.perf_counter()
    for i in range(20):
        sender.alert("loss_spike", f"spike {i}", step=i)
    assert time.perf_counter() - started < 0.5  # queued, not sent inline
    assert sender.flush(20)
    assert sender.failed == 20
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 20


def test_stalled_webhook_costs_the_caller_nothing():
    hook = Webhook(stall=True)
    try:
        sender = AlertSender("job", webhook=hook.url, attempts=2, timeout_s=0.3, backoff_s=0.01, max_queue=2)
        started = time.perf_counter()
        for i in range(10):  # more than the queue holds: the excess is dropped, not waited for
            sender.alert("hang", f"h{i}")
        assert time.perf_counter() - started < 0.5
        assert sender.dropped >= 7
        assert not sender.flush(0.1)  # a bounded wait that gives up
        sender.close(5)
    finally:
        hook.close()
