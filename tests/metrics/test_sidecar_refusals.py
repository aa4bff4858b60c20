"""What MLflow refuses (issue 13, defect 13): names it does not accept are mapped to names it does
(metrics.names), and a record it still refuses with a 4xx is reported with its line number and
skipped, while the sidecar goes on. Against the session's `mlflow server`."""

from __future__ import annotations

from mlflow import MlflowClient

from metrics.emitter import METRICS_FILE
from metrics.supervisor import start_sidecar
from tests.metrics.helpers import (
    append,
    has_run,
    history,
    run_id,
    sidecar_cli,
    start_record,
    train_record,
    valid_record,
    wait_for,
)


def _typed(step: int) -> dict:
    """A train record of a data set whose type folders are `c++`, `c#` and `.hidden`."""
    return {**train_record(step), "loss/c++": 1.0 + step, "tokens/c#": 10.0 * step, "acc/.hidden": 0.5}


def test_names_mlflow_refuses_are_mapped_and_a_refused_record_is_skipped(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    params = start_record(0, "s", **{"data.types.c++": "code", "odd key:x": 1})
    params["tags"]["team/c++"] = "x"
    refused = {**_typed(20), "time": -1.0}  # MLflow: "Timestamp must be a nonnegative long"
    append(
        tmp_path, [params, *map(_typed, range(20)), refused, *map(_typed, range(21, 40)), valid_record(39)]
    )
    refused_line = 22  # params, steps 0..19, then this one
    sidecar = start_sidecar(tmp_path, uri)
    wait_for(
        lambda: has_run(tmp_path) and len(history(uri, tmp_path, "val/loss")) == 1,
        timeout_s=60,
        what="the last record",
    )
    assert sidecar.poll() is None  # still forwarding: no crash
    append(tmp_path, [_typed(40)])
    assert sidecar.stop(timeout_s=60) == 0
    assert sidecar.restarts == 0

    steps = [s for s in range(41) if s != 20]
    assert [s for s, _ in history(uri, tmp_path, "loss/c_2B_2B")] == steps
    assert history(uri, tmp_path, "loss/c_2B_2B")[3] == (3, 4.0)
    assert [s for s, _ in history(uri, tmp_path, "tokens/c_23")] == steps
    assert [s for s, _ in history(uri, tmp_path, "acc/_.hidden")] == steps
    assert [s for s, _ in history(uri, tmp_path, "loss")] == steps
    # The refused step counts as done: a restarted sidecar does not send it again.
    assert [s for s, _ in history(uri, tmp_path, "sidecar/train_step")] == list(range(41))
    run = MlflowClient(uri).get_run(run_id(tmp_path))
    assert run.data.params["data.types.c_2B_2B"] == "code" and run.data.params["odd key_3Ax"] == "1"
    assert run.data.tags["team/c_2B_2B"] == "x"
    log = sidecar.log_file.read_text()
    assert (
        f"{METRICS_FILE}:{refused_line}: MLflow refused this train record (400 INVALID_PARAMETER_VALUE" in log
    )
    assert "'loss/c++' is logged to MLflow as 'loss/c_2B_2B'" in log
    again = sidecar_cli("--run-dir", str(tmp_path), "--tracking-uri", uri, "--once")
    assert again.returncode == 0 and "MLflow refused" not in again.stderr, again.stderr


def test_the_mapping_is_what_mlflow_accepts():
    from mlflow.utils.validation import (
        _validate_length_limit,
        _validate_metric_name,
        _validate_param_name,
        _validate_tag_name,
    )

    from metrics.names import mlflow_name  # here: the file's other tests run on any version

    names = [
        "loss/c++",
        "a:b",
        "x€",
        "a//b",
        ".x",
        "",
        "..x",
        "/a",
        "a/",
        "loss/中文",
        "x" * 300,
        "a/" + "." * 300,
    ]
    names += ["q !\"#$%&'()*+,;<=>?@[\\]^`{|}~", "ok/name-1.5 x"]
    mapped = [mlflow_name(n) for n in names]
    assert mapped[:3] == ["loss/c_2B_2B", "a_3Ab", "x_20AC"]
    assert mapped[3:10] == ["a/_/b", "_.x", "_", "_..x", "_/a", "a/_", "loss/中文"]
    assert len(mapped[10]) == 250 and mapped[10] != mlflow_name("x" * 301)
    assert mapped[-1] == "ok/name-1.5 x"  # accepted names stay as they are
    for name in mapped:
        _validate_metric_name(name)
        _validate_param_name(name)
        _validate_tag_name(name)
        _validate_length_limit("name", 250, name)
