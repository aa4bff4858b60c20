"""The sidecar: tails `<run_dir>/metrics.jsonl` and forwards its records to MLflow in log_batch
requests, exactly once per step (see metrics.mlflow_run for how it knows where MLflow's data ends).

`python -m metrics.sidecar run --run-dir DIR --tracking-uri URI` is the same as
`metrics-sidecar run ...` (what metrics.supervisor starts beside the trainer).

The file is read as segments, one per trainer start that loaded nothing (metrics.run_file): each
goes to an MLflow run of its own, named in `<run_dir>/mlflow_run.json`; a resumed start's records
continue the segment before them.

`<run_dir>/mlflow_offset.json` records how far the file has been forwarded and in which segment
(its run key and run id); it is only a hint that saves re-reading the file: it is used only when
MLflow holds at least the steps it names. Read from the start, every segment finds its own run
again and sends only the steps that run lacks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

from metrics.batches import Batcher, send
from metrics.emitter import METRICS_FILE
from metrics.mlflow_run import STEP_KEYS, Aborted, Backoff, MlflowRun, make_client, project_git_commit
from metrics.names import Names
from metrics.records import JsonlReader, Record, flatten, metrics_of, param_value
from metrics.redact import TrackingUri, redact_values
from metrics.run_file import RunEntry, RunFile

log = logging.getLogger(__name__)

OFFSET_FILE = "mlflow_offset.json"
LOCK_FILE = "sidecar.lock"
CONFIG_FILE = "config.py"
MAX_RECORDS_PER_READ = 5000


class RunDirMissing(Exception):
    pass


class Sidecar:
    """Forwards one run folder's records, each segment (trainer start) of the file to its own
    MLflow run. `run()` returns when the file is drained and (follow mode) a stop was requested
    or the parent process is gone."""

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
        self.uri = TrackingUri.parse(tracking_uri)
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
        self.refused_records = 0
        self.names = Names(reserved=frozenset(STEP_KEYS.values()))
        self.client = None
        self.runs: RunFile | None = None
        # The segment being read: its start key, mlflow_run.json entry and MLflow run (None
        # until it has something to forward), and that run's last steps and params.
        self._start = ""
        self._first_of_file = False  # reading from the file's start, no segment entered yet
        self._entry: RunEntry | None = None
        self._current: MlflowRun | None = None
        self._params: dict[str, str] = {}
        self._last: dict[str, int] = {}
        self._config_due = self._config_changed = False

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
        self.client = make_client(self.uri)
        self.runs = RunFile.load(self.run_dir)
        reader = self._reader(path)
        log.info("forwarding %s from line %d to MLflow at %s", path, reader.line + 1, self.uri.display)
        while True:
            if self._parent_gone() and not self.stop_requested:
                log.info("the trainer (pid %d) is gone: draining and stopping", self.parent_pid)
                self.request_stop()
            stopping = self.stop_requested or not follow
            records = reader.read(MAX_RECORDS_PER_READ)
            if records:
                self._forward(records)
                self._save_hint(reader)
                continue
            if stopping:
                break
            time.sleep(self.poll_s)
        if reader.pending_bytes():
            log.warning(
                "%s: line %d has no newline yet (still being written?): not forwarded", path, reader.line + 1
            )
        if self._current is not None:
            self._current.set_status(self._final_status())
        log.info(
            "drained %s up to line %d: %d steps forwarded, %d redone steps not forwarded again, "
            "%d lines skipped, %d records refused by MLflow",
            path,
            reader.line,
            self.forwarded_steps,
            self.redone_steps,
            len(reader.skipped),
            self.refused_records,
        )

    def _final_status(self) -> str:
        total = self._params.get("data.total_steps")
        done = total is not None and total.isdigit() and self._last["train"] + 1 >= int(total)
        return "FINISHED" if done else "KILLED"

    # ---- segments: each fresh trainer start is an MLflow run of its own (metrics.run_file) ----

    def _open(self, entry: RunEntry) -> MlflowRun:
        return MlflowRun.open(
            self.client, self.runs, entry, self.run_dir, self.uri, self.experiment, self.backoff
        )

    def _enter(self, entry: RunEntry, run: MlflowRun | None = None) -> None:
        """Forward what follows to this segment's run (opened, created if need be)."""
        run = run or self._open(entry)
        self._entry, self._current = entry, run
        self._last, self._params = run.state()
        self._first_of_file = False
        run.set_status("RUNNING")
        log.info(
            "segment %s: MLflow run %s (forwarding steps after train %d, valid %d)",
            entry.start or "(file start)",
            run.run_id,
            self._last["train"],
            self._last["valid"],
        )

    def _leave(self) -> None:
        if self._current is not None:
            self._current.set_status(self._final_status())
        self._entry = self._current = None

    def _reader(self, path: Path) -> JsonlReader:
        """Starts at the hint's offset, in the hint's segment, when MLflow holds everything the
        hint says was forwarded; else at the file's start."""
        hint_path = self.run_dir / OFFSET_FILE
        try:
            hint = json.loads(hint_path.read_text())
            key = hint.get("run_key")  # absent in hints of sidecars before segments
            entry = self.runs.by_key(key) if key else self.runs.by_run_id(hint["run_id"])
            offset, line = int(hint["offset"]), int(hint["line"])
            # .get: hints written before `event` records have no step for them
            hinted = {kind: int(hint["last_step"].get(kind, -1)) for kind in STEP_KEYS}
            usable = entry is not None and entry.run_id == hint["run_id"] and path.stat().st_size >= offset
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return self._from_start(path)
        if usable:
            run = self._open(entry)
            last, _ = run.state()
            if run.run_id == hint["run_id"] and all(hinted[k] <= last[k] for k in STEP_KEYS):
                self._enter(entry, run)
                return JsonlReader(path, offset=offset, line=line)
        log.info("%s does not match MLflow's data: reading %s from the start", hint_path, path)
        return self._from_start(path)

    def _from_start(self, path: Path) -> JsonlReader:
        self._start, self._first_of_file = "", True
        return JsonlReader(path)

    def _save_hint(self, reader: JsonlReader) -> None:
        if self._current is None:
            return
        hint = {
            "run_key": self._entry.run_key,
            "run_id": self._current.run_id,
            "offset": reader.offset,
            "line": reader.line,
            "last_step": self._last,
        }
        tmp = self.run_dir / (OFFSET_FILE + ".tmp")
        tmp.write_text(json.dumps(hint))
        os.replace(tmp, self.run_dir / OFFSET_FILE)

    def _forward(self, records: list[Record]) -> None:
        batcher = Batcher()
        for record in records:
            start = record.fresh_start
            if start is not None and (self._entry is None or start != self._entry.start):
                # A new trainer start that loaded nothing: its records go to a new MLflow run.
                self._flush(batcher)
                batcher = Batcher()
                self._leave()
                self._start = start
            if self._current is None:
                self._enter(self.runs.entry_for(self._start, first_of_file=self._first_of_file))
            if record.kind == "params":
                self._add_params(batcher, record)
                continue
            self._add_step(batcher, record)
        self._flush(batcher)

    def _flush(self, batcher: Batcher) -> None:
        if self._current is None:
            return
        send(self._current, batcher, self._on_refused)
        config = self.run_dir / CONFIG_FILE
        if self._config_due and config.is_file():
            if self._config_changed or not self._current.has_artifact(CONFIG_FILE):
                self._current.log_artifact(config, scrub=self.uri.scrub)
        self._config_due = self._config_changed = False

    def _on_refused(self, record: Record) -> None:
        self.refused_records += 1

    def _add_step(self, batcher: Batcher, record: Record) -> None:
        from mlflow.entities import Metric

        step = record.step
        if step <= self._last[record.kind]:
            self.redone_steps += 1
            return
        ts = record.timestamp_ms
        where = f"{METRICS_FILE}:{record.line}"
        metrics = [Metric(k, v, ts, step) for k, v in self.names.mapped(metrics_of(record), where).items()]
        batcher.add_metrics(record, metrics, Metric(STEP_KEYS[record.kind], float(step), ts, step))
        self._last[record.kind] = step
        self.forwarded_steps += 1

    def _text(self, value, limit: int) -> str:
        """A param or tag value as logged: credentials masked, then cut to MLflow's limit."""
        return param_value(self.uri.scrub(param_value(redact_values(value), 1 << 30)), limit)

    def _add_params(self, batcher: Batcher, record: Record) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        where = f"{METRICS_FILE}:{record.line}"
        raw = flatten(record.data.get("params") or {}, "", {}, ".")
        params = self.names.mapped(raw, where)
        changed = []
        for key, value in params.items():
            text = self._text(value, MAX_PARAM_VAL_LENGTH)
            if key not in self._params:
                batcher.add_param(record, Param(key, text))
                self._params[key] = text
                self._config_changed = True
            elif self._params[key] != text:
                changed.append(f"{key}: {self._params[key]!r} -> {text!r}")
                self._config_changed = True
        self._config_due = True
        if changed:
            log.warning(
                "%s: the restarted run changed params that MLflow keeps immutable "
                "(kept the first values): %s",
                where,
                self.uri.scrub("; ".join(changed[:20])),
            )
        for key, value in self.names.mapped(_tags(record.data.get("tags") or {}, raw), where).items():
            batcher.add_tag(record, RunTag(key, self._text(value, MAX_TAG_VAL_LENGTH)))


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
