"""InternLM's windowed throughput fields (tgs/*): their definitions, their place on the log line,
their MLflow names, and their values in a real training run."""

from __future__ import annotations

import json

from metrics.names import mlflow_name
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import config_from_text
from train_kernel.train.log_line import format_log_line
from train_kernel.train.tgs_stats import TgsStats
from train_kernel.train.trainer import train

FIELDS = ["tgs/last_tgs_1", "tgs/tgs_all", "tgs/tgs_avg", "tgs/tgs_SMA", "tgs/last_tgs_10", "tgs/last_tgs_50"]


def test_definitions_over_known_steps():
    stats = TgsStats()
    # Step i (1-based) moves 100 tokens per GPU in i seconds for 60 steps.
    rows = [stats.update(100.0, float(i)) for i in range(1, 61)]
    assert list(rows[0]) == FIELDS
    first = rows[0]
    assert [first[name] for name in FIELDS[:4]] == [100.0] * 4
    assert first["tgs/last_tgs_10"] == first["tgs/last_tgs_50"] == 0  # no complete block yet
    assert rows[8]["tgs/last_tgs_10"] == 0 and rows[9]["tgs/last_tgs_10"] == round(1000 / 55, 2)
    assert rows[19]["tgs/last_tgs_10"] == round(1000 / sum(range(11, 21)), 2)
    assert rows[48]["tgs/last_tgs_50"] == 0
    assert rows[49]["tgs/last_tgs_50"] == round(5000 / sum(range(1, 51)), 2)
    last = rows[59]
    assert last["tgs/last_tgs_1"] == round(100 / 60, 2)
    assert last["tgs/tgs_all"] == round(6000 / sum(range(1, 61)), 2)  # token-weighted
    assert last["tgs/tgs_avg"] == round(sum(round(100 / i, 2) for i in range(1, 61)) / 60, 2)  # step mean
    assert last["tgs/tgs_SMA"] == round(5000 / sum(range(11, 61)), 2)  # the last 50 steps
    assert last["tgs/last_tgs_50"] == rows[49]["tgs/last_tgs_50"]  # until step 100


def test_fields_follow_tgs_on_the_line_and_keep_their_mlflow_names():
    record = {"tflops": 1.0, "step": 3, "loss": 2.5, "tgs": 10.0, "lr": 0.1, "tgs/last_tgs_1": 11.0}
    record["grad_norm"] = {"0_default": 1.5, "1_no_decay": 0.5}
    line = format_log_line(record)
    expected = "tflops=1.0 step=3 loss=2.5 tgs (tokens/gpu/second)=10.0 tgs/last_tgs_1=11.0 lr=0.1"
    assert line.startswith(expected)
    assert "grad_norm={'0_default': 1.5, '1_no_decay': 0.5}" in line  # one entry per parameter group
    assert all(mlflow_name(name) == name for name in FIELDS)


def test_a_real_run_records_sane_tgs_fields(tmp_path):
    run_dir = tmp_path / "run"
    train(config_from_text(tiny_config_text(run_dir, total_steps=10)))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert len(records) == 10
    for index, record in enumerate(records):
        for name in FIELDS[:4]:
            assert record[name] > 0, (index, name)
        assert record["tgs/tgs_SMA"] == record["tgs/tgs_all"]  # fewer than 50 steps: the same window
        assert (record["tgs/last_tgs_10"] > 0) == (index >= 9)
        assert record["tgs/last_tgs_50"] == 0
    # The one-step figure is the step's own tgs (both: global tokens / world size / step seconds).
    assert all(record["tgs/last_tgs_1"] == record["tgs"] for record in records)
    log = (run_dir / "train.log").read_text()
    assert "tgs (tokens/gpu/second)=" in log and " tgs/tgs_SMA=" in log and " tgs/last_tgs_10=" in log
