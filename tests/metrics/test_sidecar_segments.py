"""A run folder used again (issue 13, defect 12): every trainer start that loaded nothing opens a
new MLflow run, a resumed start continues its own, and a sidecar re-reading the file from any point
sends each part of the file to its own run, exactly once. Against the session's `mlflow server`."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from metrics.mlflow_run import RUN_FILE
from metrics.sidecar import OFFSET_FILE
from tests.metrics.helpers import (
    append,
    folder_runs,
    run_history,
    run_id,
    sidecar_cli,
    start_record,
    train_record,
)


def _once(run_dir, uri) -> str:
    result = sidecar_cli("--run-dir", str(run_dir), "--tracking-uri", uri, "--once")
    assert result.returncode == 0, result.stderr
    return result.stderr


def _loss(seed: float, steps) -> list[tuple[int, float]]:
    return [(s, train_record(s, seed)["loss"]) for s in steps]


def test_fresh_start_in_a_used_folder_gets_a_new_run_and_a_resume_continues_it(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    append(tmp_path, [start_record(0, "first"), *(train_record(s) for s in range(30))])
    _once(tmp_path, uri)
    first = run_id(tmp_path)
    # A new training run in the same folder (nothing loaded): its steps 0..9 are not "redone".
    append(tmp_path, [start_record(0, "second"), *(train_record(s, seed=1.0) for s in range(10))])
    _once(tmp_path, uri)
    second = run_id(tmp_path)
    assert second != first
    assert run_history(uri, second, "loss") == _loss(1.0, range(10))
    assert run_history(uri, first, "loss") == _loss(0.0, range(30))
    assert MlflowClient(uri).get_run(first).info.status == "KILLED"  # ended by the new start
    # That run resumes from its checkpoint of step 5: steps 5..9 are redone (first values stay).
    append(tmp_path, [start_record(5, "second-resumed"), *(train_record(s, seed=2.0) for s in range(5, 15))])
    _once(tmp_path, uri)
    assert run_id(tmp_path) == second
    assert run_history(uri, second, "loss") == _loss(1.0, range(10)) + _loss(2.0, range(10, 15))

    # A sidecar that has to read the whole file again (no usable hint), and one killed after
    # creating the second run but before saving its id: each part still goes to its own run, once.
    (tmp_path / OFFSET_FILE).unlink()
    saved = json.loads((tmp_path / RUN_FILE).read_text())
    assert [(r["start"], r["run_id"]) for r in saved["runs"]] == [("first", first), ("second", second)]
    del saved["runs"][1]["run_id"]
    (tmp_path / RUN_FILE).write_text(json.dumps(saved))
    _once(tmp_path, uri)
    assert [r.info.run_id for r in folder_runs(uri, tmp_path)] == [first, second]
    assert run_id(tmp_path) == second
    assert run_history(uri, first, "loss") == _loss(0.0, range(30))
    assert run_history(uri, second, "loss") == _loss(1.0, range(10)) + _loss(2.0, range(10, 15))
    assert [s for s, _ in run_history(uri, second, "sidecar/train_step")] == list(range(15))


def test_files_and_run_files_of_older_versions(mlflow_server, tmp_path):
    """Params records without `start_id` (older trainers) and a mlflow_run.json / hint written by
    a sidecar that knew one run per folder: that run keeps the file's first part."""
    uri = mlflow_server.uri
    append(tmp_path, [start_record(0), *(train_record(s) for s in range(20))])
    _once(tmp_path, uri)
    first = run_id(tmp_path)
    saved = json.loads((tmp_path / RUN_FILE).read_text())
    legacy = {"run_key": saved["run_key"], "run_id": first, "tracking_uri": uri, "experiment": "llm-pretrain"}
    (tmp_path / RUN_FILE).write_text(json.dumps(legacy))
    hint = json.loads((tmp_path / OFFSET_FILE).read_text())
    del hint["run_key"]
    (tmp_path / OFFSET_FILE).write_text(json.dumps(hint))

    append(tmp_path, [start_record(0), *(train_record(s, seed=1.0) for s in range(8))])
    _once(tmp_path, uri)
    second = run_id(tmp_path)
    assert second != first
    assert run_history(uri, second, "loss") == _loss(1.0, range(8))
    (tmp_path / OFFSET_FILE).unlink()  # and once more from the file's start
    _once(tmp_path, uri)
    assert [r.info.run_id for r in folder_runs(uri, tmp_path)] == [first, second]
    assert run_history(uri, first, "loss") == _loss(0.0, range(20))
    assert run_history(uri, second, "loss") == _loss(1.0, range(8))
    starts = [r["start"] for r in json.loads((tmp_path / RUN_FILE).read_text())["runs"]]
    assert len(starts) == 2 and all(s.startswith("sha1:") for s in starts) and starts[0] != starts[1]
