"""Records of kind `event` (a trainer's rollbacks, issue 17) reach MLflow as metrics at their step,
and a restarted sidecar does not send them twice. Against the session's `mlflow server`."""

from __future__ import annotations

from metrics.supervisor import start_sidecar
from tests.metrics.helpers import append, has_run, history, start_record, train_record, wait_for


def _rollback(step: int, number: int) -> dict:
    return {
        "kind": "event",
        "time": 1.8e9 + step + 0.5,
        "step": step,
        "event": "rollback",
        "reason": "loss spike",
        "rollback": {"number": number, "to_step": step - 2, "skipped_batches": 3},
    }


def test_event_records_are_forwarded_once(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    append(tmp_path, [start_record(0, "s"), *map(train_record, range(6)), _rollback(5, 1)])
    sidecar = start_sidecar(tmp_path, uri)
    wait_for(
        lambda: has_run(tmp_path) and len(history(uri, tmp_path, "rollback/number")) == 1,
        timeout_s=60,
        what="the event",
    )
    assert sidecar.stop(timeout_s=60) == 0
    assert "not a metrics record" not in sidecar.log_file.read_text()
    append(tmp_path, [*map(train_record, range(4, 9)), _rollback(8, 2)])
    again = start_sidecar(tmp_path, uri)
    wait_for(lambda: len(history(uri, tmp_path, "rollback/number")) == 2, timeout_s=60, what="the 2nd event")
    assert again.stop(timeout_s=60) == 0
    assert history(uri, tmp_path, "rollback/number") == [(5, 1.0), (8, 2.0)]
    assert history(uri, tmp_path, "rollback/to_step") == [(5, 3.0), (8, 6.0)]
    assert [s for s, _ in history(uri, tmp_path, "sidecar/event_step")] == [5, 8]
