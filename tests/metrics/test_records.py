"""Reading metrics.jsonl while it is written, and what becomes an MLflow metric or param (no MLflow
server needed)."""

from __future__ import annotations

import json
import logging
import math

from metrics.batches import Batcher
from metrics.emitter import METRICS_FILE, MetricsEmitter
from metrics.records import JsonlReader, Record, metrics_of, param_value
from tests.metrics.helpers import append, train_record


def test_partial_last_line_is_waited_for_then_read(tmp_path):
    append(tmp_path, [train_record(0)], text='{"kind":"train","step":1,"loss":')
    reader = JsonlReader(tmp_path / METRICS_FILE)
    assert [r.step for r in reader.read(100)] == [0]
    assert reader.read(100) == [] and reader.pending_bytes() > 0 and not reader.skipped
    append(tmp_path, [], text="2.5}\n")
    [record] = reader.read(100)
    assert (record.step, record.line, record.data["loss"]) == (1, 2, 2.5)


def test_malformed_lines_are_reported_with_line_number_and_skipped(tmp_path, caplog):
    append(tmp_path, [train_record(0)], text='not json\n{"kind":"train"}\n[1,2]\n')
    append(tmp_path, [train_record(1)])
    # A record that a killed trainer's fragment runs into is recovered.
    append(tmp_path, [], text='{"kind":"train","step":2,"lo' + json.dumps(train_record(3)) + "\n")
    reader = JsonlReader(tmp_path / METRICS_FILE)
    with caplog.at_level(logging.WARNING):
        records = reader.read(100)
    assert [r.step for r in records] == [0, 1, 3]
    assert reader.skipped == [2, 3, 4, 6]
    assert f"{METRICS_FILE}:2: not a metrics record (not json)" in caplog.text
    assert f"{METRICS_FILE}:6:" in caplog.text and "recover" not in caplog.text


def test_emitter_ends_a_dead_runs_fragment_before_appending(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"kind":"train","step":0}\n{"kind":"tra')
    emitter = MetricsEmitter(tmp_path)
    emitter.emit("train", {"step": 1, "loss": float("nan")})
    emitter.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert lines[1] == '{"kind":"tra' and json.loads(lines[2])["step"] == 1


def test_numeric_fields_become_metrics_dicts_flattened(tmp_path):
    append(tmp_path, [train_record(5)])
    [record] = JsonlReader(tmp_path / METRICS_FILE).read(10)
    metrics = metrics_of(record)
    assert (
        metrics["grad_norm/0_default"] == 1.05
        and metrics["acc/code"] == 0.33
        and math.isnan(metrics["loss/en"])
    )
    assert not {"step", "time", "kind", "note", "grad_norm"} & set(metrics)
    assert len(metrics) == 26 and record.timestamp_ms == 1_800_000_005_000


def test_batches_respect_mlflow_limits():
    from mlflow.entities import Metric, Param

    batcher = Batcher()
    params = Record("params", 1, 0, {})
    for i in range(250):
        batcher.add_param(params, Param(f"p{i}", "v"))
    for step in range(100):  # 31 metrics per record: a record never straddles two requests
        record = Record("train", step + 2, 0, {"step": step})
        metrics = [Metric(f"m{i}", 1.0, 0, step) for i in range(30)]
        batcher.add_metrics(record, metrics, Metric("sidecar/train_step", step, 0, step))
    requests = batcher.nonempty()
    assert all(len(r.entities("params")) + len(r.entities("tags")) <= 100 for r in requests)
    assert all(r.size() <= 1000 for r in requests)
    assert sum(len(r.entities("params")) for r in requests) == 250
    assert sum(len(r.entities("metrics")) for r in requests) == 3100
    # Each part is one record's (the refused-record fallback resends parts), sentinel last.
    for request in requests:
        for part in request.parts:
            if part.record.kind == "train":
                assert len(part.metrics) == 31 and part.metrics[-1] is part.sentinel
    assert len(param_value("x" * 7000, 6000)) == 6000


def test_poison_records_are_skipped_by_line_and_the_reader_goes_on(tmp_path, caplog, monkeypatch):
    """Records the trainer would never write but a damaged or foreign file holds: each is skipped
    with its line number instead of crash-looping the sidecar."""
    from metrics import records as records_module

    deep = '{"kind":"train","step":3,"x":' + "[" * 50_000 + "]" * 50_000 + "}\n"
    giant = '{"kind":"train","step":4,"note":"' + "n" * (2 << 20) + '"}\n'  # over the 1 MiB limit set below
    append(tmp_path, [train_record(0)], text='{"kind":"train","step":1,"loss":' + "9" * 400 + "}\n")
    append(tmp_path, [], text='{"kind":"train","step":2,"time":"yesterday","loss":1.0}\n' + deep + giant)
    append(
        tmp_path,
        [train_record(5)],
        text='{"kind":"valid","step":6,"val/loss":{"a":' * 2000 + "1" + "}" * 2000 + "}\n",
    )
    append(tmp_path, [train_record(7)])
    # Beyond MLflow's 64-bit steps and timestamps (its client fails on them, no 4xx to skip by).
    append(
        tmp_path, [{**train_record(8), "step": 1 << 63}, {**train_record(9), "time": 1e20}, train_record(10)]
    )
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(records_module, "MAX_RECORD_BYTES", 1 << 20)
    reader = JsonlReader(tmp_path / METRICS_FILE)
    got = reader.read(100)
    assert [r.step for r in got] == [0, 5, 7, 10]
    assert reader.skipped == [2, 3, 4, 5, 7, 9, 10]
    assert f"{METRICS_FILE}:9: step {1 << 63} is beyond MLflow's 64-bit steps" in caplog.text
    assert f"{METRICS_FILE}:10: time 1e+20 is beyond MLflow's 64-bit timestamps" in caplog.text
    assert f"{METRICS_FILE}:2: not forwardable (OverflowError" in caplog.text
    assert f"{METRICS_FILE}:3: time is str, not a number" in caplog.text
    assert f"{METRICS_FILE}:5: a line of {len(giant.encode())} bytes; skipped" in caplog.text
    assert reader.pending_bytes() == 0
