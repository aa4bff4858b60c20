"""The health and fault_injection sections: defaults, errors naming the key, documented fields;
monitor.alert and alert_address choose where alerts go (rank 0 only)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from train_kernel.config import ConfigError, config_from_text, field_docs
from train_kernel.config.health_sections import FaultInjectionConfig, HealthConfig, LossSpikeConfig
from train_kernel.config.notices import config_notices
from train_kernel.health.run_health import open_alerts


def test_defaults_are_off_except_the_skip_streak():
    config = config_from_text("JOB_NAME = 'x'\n")
    health, faults = config.health, config.fault_injection
    assert (health.max_consecutive_skips, health.max_rollbacks, health.loss_spike) == (20, 3, None)
    assert (health.hang_timeout_s, health.profiling, health.alert_format) == (None, False, "feishu")
    assert faults == FaultInjectionConfig()
    assert config.to_json()["health.max_rollbacks"] == 3


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("health = dict(loss_spike=dict(factor=0.5))", "health.loss_spike.factor", "must be > 1"),
        ("health = dict(loss_spike=dict(window=0))", "health.loss_spike.window", "must be >= 1"),
        ("health = dict(hang_timeout_s=0)", "health.hang_timeout_s", "must be > 0"),
        ("health = dict(max_rollbacks=-1)", "health.max_rollbacks", "must be >= 0"),
        ("health = dict(profile_steps=(5, 2))", "health.profile_steps", "first <= last"),
        ("health = dict(alert_format='xml')", "health.alert_format", "'feishu' or 'json'"),
        ("health = dict(max_rollback=2)", "health.max_rollback", "unknown key"),
        ("fault_injection = dict(hang_rank=-1)", "fault_injection.hang_rank", "must be >= 0"),
        ("fault_injection = dict(nonfinite_grad_at_steps=[-2])", "fault_injection.nonfinite", ">= 0"),
    ],
)
def test_bad_values_name_their_key(text, key, message):
    with pytest.raises(ConfigError) as error:
        config_from_text(text + "\n")
    assert key in str(error.value) and message in str(error.value)


def test_every_field_is_documented():
    for cls in (HealthConfig, LossSpikeConfig, FaultInjectionConfig):
        docs = field_docs(cls)
        assert all(docs.get(f.name) for f in dataclasses.fields(cls)), cls


def test_straggler_keys_are_applied_so_no_notice():
    text = "data = dict(empty_cache_and_diag_interval=10, diag_outlier_ratio=1.2)\n"
    assert config_notices(config_from_text(text), {"data": {"empty_cache_and_diag_interval": 10}}) == []


def _sender(text: str, rank: int = 0):
    return open_alerts(config_from_text(text + "\n"), SimpleNamespace(rank=rank))


def test_where_alerts_go():
    enabled = "monitor = dict(alert=dict(enable_feishu_alert=True, feishu_alert_address='http://h/x', "
    sender = _sender(enabled + "light_monitor_address='m:9000', alert_file_path='/tmp/a'))")
    assert (sender.webhook, sender.heartbeat_url, str(sender.alert_file)) == (
        "http://h/x",
        "http://m:9000",
        "/tmp/a",
    )
    assert _sender("monitor = dict(alert=dict(feishu_alert_address='http://h/x'))").webhook is None
    assert _sender("alert_address = 'http://old'").webhook == "http://old"  # InternLM's older key
    other = _sender(enabled + "alert_file_path='/tmp/a'))", rank=1)
    assert not other.enabled  # only rank 0 sends
    for item in (sender, other):
        item.close(1)
