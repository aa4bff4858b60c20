"""The sidecar: tails `<run_dir>/metrics.jsonl` and forwards its records to MLflow in log_batch
requests, exactly once per step (see metrics.mlflow_run for how it knows where MLflow's data ends).

`python -m metrics.sidecar run --run-dir DIR --tracking-uri URI` is the same as
`metrics-sidecar run ...` (what metrics.supervisor starts beside the trainer).

`<run_dir>/mlflow_offset.json` records how far the file has been forwarded; it is only a hint that
saves re-reading the file: it is used only when MLflow holds at least the steps it names.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from metrics.emitter import METRICS_FILE
from metrics.mlflow_run import STEP_KEYS, Aborted, Backoff, MlflowRun, project_git_commit
from metrics.records import JsonlReader, Record, flatten, metrics_of, param_value

log = logging.getLogger(__name__)

OFFSET_FILE = "mlflow_offset.json"
LOCK_FILE = "sidecar.lock"
CONFIG_FILE = "config.py"
MAX_RECORDS_PER_READ = 5000


class RunDirMissing(Exception):
    pass


@dataclass
class _Request:
    """One log_batch request, within MLflow's limits (1000 entities, 100 params + tags)."""

    metrics: list = field(default_factory=list)
    params: list = field(default_factory=list)
    tags: list = field(default_factory=list)

    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


class _Batcher:
    def __init__(self) -> None:
        from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        self.max_entities = MAX_ENTITIES_PER_BATCH
        self.max_params_tags = MAX_PARAMS_TAGS_PER_BATCH
        self.requests: list[_Request] = [_Request()]

    def _room(self, metrics: int = 0, params_tags: int = 0) -> _Request:
        current = self.requests[-1]
        if current.size() + metrics + params_tags > self.max_entities or (
            params_tags and len(current.params) + len(current.tags) + params_tags > self.max_params_tags
        ):
            current = _Request()
            self.requests.append(current)
        return current

    def add_metrics(self, metrics: list) -> None:
        """A record's metrics (its step sentinel last) go into one request when they fit in one,
        so that the sentinel is committed together with them."""
        if len(metrics) > self.max_entities:  # more fields than one request holds: split, sentinel last
            for start in range(0, len(metrics), self.max_entities):
                self._room(metrics=self.max_entities).metrics.extend(
                    metrics[start : start + self.max_entities]
                )
            return
        self._room(metrics=len(metrics)).metrics.extend(metrics)

    def add_param(self, param) -> None:
        self._room(params_tags=1).params.append(param)

    def add_tag(self, tag) -> None:
        self._room(params_tags=1).tags.append(tag)

    def nonempty(self) -> list[_Request]:
        return [r for r in self.requests if r.size()]


class Sidecar:
    """Forwards one run folder's records to one MLflow run. `run()` returns when the file is
    drained and (follow mode) a stop was requested or the parent process is gone."""

    def __init__(
        self,
        run_dir: Path,
        tracking_uri: str,
        experiment: str | None = None,
        poll_s: float = 0.2,
        parent_pid: int | None = None,
        drain_timeout_s: float = 120.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.poll_s = poll_s
        self.parent_pid = parent_pid
        self.drain_timeout_s = drain_timeout_s
        self.stop_requested = False
        self.abort_requested = False
        self._stop_deadline: float | None = None
        self.backoff = Backoff(abort=self._should_abort)
        self.forwarded_steps = 0
        self.redone_steps = 0
        self._params: dict[str, str] = {}
        self._last: dict[str, int] = {}

    def request_stop(self) -> None:
        """Drain what is in the file now, then return. A second request, or MLflow unreachable for
        drain_timeout_s after the first, aborts the drain (the next start continues it)."""
        if self.stop_requested:
            self.abort_requested = True
        else:
            self._stop_deadline = time.monotonic() + self.drain_timeout_s
        self.stop_requested = True

    def _should_abort(self) -> bool:
        """Asked between retries while MLflow is unreachable."""
        if self._parent_gone() and not self.stop_requested:
            log.info("the trainer (pid %d) is gone: stopping", self.parent_pid)
            self.request_stop()
        return self.abort_requested or (
            self._stop_deadline is not None and time.monotonic() > self._stop_deadline
        )

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self, follow: bool) -> None:
        if not self.run_dir.is_dir():
            raise RunDirMissing(
                f"run folder {self.run_dir} does not exist: pass the trainer's run folder "
                f"(runs/<JOB_NAME> by default, or the config's run_dir), the one that holds {METRICS_FILE}"
            )
        lock = self._lock()
        try:
            self._run(follow)
        finally:
            os.close(lock)

    def _lock(self) -> int:
        """One sidecar per run folder: a second one (say, a restarted trainer's, while the crashed
        one's sidecar still drains) waits, or both would read the same "last step" from MLflow."""
        fd = os.open(self.run_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if not waited:
                    log.info("another sidecar is forwarding %s: waiting for it to finish", self.run_dir)
                    waited = True
                if self._should_abort():
                    os.close(fd)
                    raise Aborted(f"stopped while another sidecar held {self.run_dir / LOCK_FILE}") from None
                time.sleep(self.poll_s)

    def _run(self, follow: bool) -> None:
        path = self.run_dir / METRICS_FILE
        while not path.exists():
            if not follow or self.stop_requested or self._parent_gone():
                log.info("%s does not exist yet: nothing to forward", path)
                return
            time.sleep(self.poll_s)
        mlflow_run = MlflowRun.open(self.run_dir, self.tracking_uri, self.experiment, self.backoff)
        self._last, self._params = mlflow_run.state()
        reader = self._reader(path, mlflow_run.run_id)
        mlflow_run.set_status("RUNNING")
        log.info(
            "forwarding %s from line %d to MLflow run %s (steps after train %d, valid %d)",
            path,
            reader.line + 1,
            mlflow_run.run_id,
            self._last["train"],
            self._last["valid"],
        )
        while True:
            if self._parent_gone() and not self.stop_requested:
                log.info("the trainer (pid %d) is gone: draining and stopping", self.parent_pid)
                self.request_stop()
            stopping = self.stop_requested or not follow
            records = reader.read(MAX_RECORDS_PER_READ)
            if records:
                self._forward(mlflow_run, records)
                self._save_hint(reader, mlflow_run.run_id)
                continue
            if stopping:
                break
            time.sleep(self.poll_s)
        if reader.pending_bytes():
            log.warning(
                "%s: line %d has no newline yet (still being written?): not forwarded", path, reader.line + 1
            )
        mlflow_run.set_status(self._final_status())
        log.info(
            "drained %s up to line %d: %d steps forwarded, %d redone steps not forwarded again, "
            "%d lines skipped",
            path,
            reader.line,
            self.forwarded_steps,
            self.redone_steps,
            len(reader.skipped),
        )

    def _final_status(self) -> str:
        total = self._params.get("data.total_steps")
        done = total is not None and total.isdigit() and self._last["train"] + 1 >= int(total)
        return "FINISHED" if done else "KILLED"

    def _reader(self, path: Path, run_id: str) -> JsonlReader:
        """Starts at the hint's offset when MLflow holds everything the hint says was forwarded."""
        hint_path = self.run_dir / OFFSET_FILE
        try:
            hint = json.loads(hint_path.read_text())
            usable = (
                hint["run_id"] == run_id
                and all(hint["last_step"][kind] <= self._last[kind] for kind in STEP_KEYS)
                and path.stat().st_size >= hint["offset"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return JsonlReader(path)
        if not usable:
            log.info("%s does not match MLflow's data: reading %s from the start", hint_path, path)
            return JsonlReader(path)
        return JsonlReader(path, offset=int(hint["offset"]), line=int(hint["line"]))

    def _save_hint(self, reader: JsonlReader, run_id: str) -> None:
        hint = {"run_id": run_id, "offset": reader.offset, "line": reader.line, "last_step": self._last}
        tmp = self.run_dir / (OFFSET_FILE + ".tmp")
        tmp.write_text(json.dumps(hint))
        os.replace(tmp, self.run_dir / OFFSET_FILE)

    def _forward(self, mlflow_run: MlflowRun, records: list[Record]) -> None:
        from mlflow.entities import Metric

        batcher = _Batcher()
        artifact = False
        for record in records:
            if record.kind == "params":
                self._add_params(batcher, record)
                artifact = True
                continue
            step = record.step
            if step <= self._last[record.kind]:
                self.redone_steps += 1
                continue
            ts = record.timestamp_ms
            metrics = [Metric(key, value, ts, step) for key, value in metrics_of(record).items()]
            metrics.append(Metric(STEP_KEYS[record.kind], float(step), ts, step))
            batcher.add_metrics(metrics)
            self._last[record.kind] = step
            self.forwarded_steps += 1
        for request in batcher.nonempty():
            mlflow_run.log_batch(request.metrics, request.params, request.tags)
        config = self.run_dir / CONFIG_FILE
        if artifact and config.is_file():
            mlflow_run.log_artifact(config)

    def _add_params(self, batcher: _Batcher, record: Record) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        params = flatten(record.data.get("params") or {}, "", {}, ".")
        changed = []
        for key, value in params.items():
            text = param_value(value, MAX_PARAM_VAL_LENGTH)
            if key not in self._params:
                batcher.add_param(Param(key, text))
                self._params[key] = text
            elif self._params[key] != text:
                changed.append(f"{key}: {self._params[key]!r} -> {text!r}")
        if changed:
            log.warning(
                "%s:%d: the restarted run changed params that MLflow keeps immutable "
                "(kept the first values): %s",
                METRICS_FILE,
                record.line,
                "; ".join(changed[:20]),
            )
        for key, value in _tags(record.data.get("tags") or {}, params).items():
            batcher.add_tag(RunTag(key, param_value(value, MAX_TAG_VAL_LENGTH)))


def _tags(tags: dict, params: dict) -> dict[str, str]:
    """The record's tags, the parallel layout and the project's git commit."""
    out = {key: str(value) for key, value in flatten(tags, "", {}, ".").items()}
    world = tags.get("world_size")
    pp = params.get("parallel.pipeline.size", 1) or 1
    tp = params.get("parallel.tensor.size", 1) or 1
    if isinstance(world, int) and isinstance(pp, int) and isinstance(tp, int):
        zero1 = params.get("parallel.zero1")
        out["parallel"] = f"world={world} dp={world // (pp * tp)} pp={pp} tp={tp} zero1={zero1}"
    commit = project_git_commit()
    if commit:
        out["mlflow.source.git.commit"] = commit
    return out


if __name__ == "__main__":
    from metrics.cli import main

    main()
