"""The sidecar's side of MLflow: which MLflow run a run folder forwards to, what that run already
holds (the last step forwarded per record kind), and retrying calls with backoff while MLflow is
down.

Run identity: `<run_dir>/mlflow_run.json` (metrics.run_file) names the MLflow run of each segment
of the file (one per fresh trainer start; a resumed start continues its segment's run) by a key
written durably before the run exists. The MLflow run carries the key as the tag
`sidecar_run_key`, so a sidecar killed between creating the run and writing its id finds that run
again instead of making a second one.

Progress: every forwarded train/valid record also logs `sidecar/train_step` (or
`sidecar/valid_step`) with the step as its value, in the same log_batch request as the record's
last metrics (one request's metrics are committed together). MLflow's latest value of that key is
therefore the last step whose metrics are all in MLflow: the sidecar forwards only records beyond
it, after any restart of itself or of the MLflow server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from metrics.redact import TrackingUri, redact_uri
from metrics.run_file import RUN_FILE, RunEntry, RunFile

log = logging.getLogger(__name__)

__all__ = ["RUN_FILE", "MlflowRun", "Backoff", "Aborted", "make_client", "is_refused"]

RUN_KEY_TAG = "sidecar_run_key"
STEP_KEYS = {"train": "sidecar/train_step", "valid": "sidecar/valid_step", "event": "sidecar/event_step"}
DEFAULT_EXPERIMENT = "llm-pretrain"

T = TypeVar("T")


class Aborted(Exception):
    """A second stop request came while MLflow was unreachable: give up without draining."""


def configure_http() -> None:
    """This process's MLflow client: one attempt per request (the sidecar retries itself, with
    backoff, and can then notice stop requests), a bounded timeout, no usage telemetry."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: MLflow unreachable, overloaded or restarting; a busy SQLite file."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(
        exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    ):
        return True
    if isinstance(exc, MlflowException):
        # 401/403: credentials or permissions, not the request: waited on (someone fixes them;
        # nothing is skipped meanwhile). 408/429: the server is busy.
        status = exc.get_http_status_code()
        return status >= 500 or status in (401, 403, 408, 429)
    try:
        import sqlalchemy.exc

        return isinstance(exc, sqlalchemy.exc.OperationalError)
    except ImportError:  # pragma: no cover
        return False


def is_refused(exc: BaseException) -> bool:
    """MLflow refused the request itself (a 4xx that retrying cannot change): its data is skipped."""
    from mlflow.exceptions import MlflowException

    return (
        isinstance(exc, MlflowException) and 400 <= exc.get_http_status_code() < 500 and not is_transient(exc)
    )


def describe(exc: BaseException) -> str:
    """One line for the log: the HTTP status, MLflow's error code and the message's start."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return f"{exc.get_http_status_code()} {exc.error_code}: {str(exc.message)[:300]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class Backoff:
    """Calls a function until it succeeds, sleeping first_s, 2 x first_s, ... up to max_s between
    transient failures; other errors propagate. `abort()` returning true ends the wait."""

    def __init__(
        self, abort: Callable[[], bool] = lambda: False, first_s: float = 0.25, max_s: float = 5.0
    ) -> None:
        self.abort = abort
        self.first_s = first_s
        self.max_s = max_s

    def call(self, what: str, fn: Callable[[], T]) -> T:
        delay, failures = self.first_s, 0
        while True:
            try:
                result = fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "MLflow: %s failed (%s: %s); retry %d in %.1f s",
                        what,
                        type(exc).__name__,
                        str(exc)[:200],
                        failures,
                        delay,
                    )
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    if self.abort():
                        raise Aborted(f"stopped while MLflow was unreachable ({what})") from exc
                    time.sleep(min(0.05, delay))
                delay = min(delay * 2, self.max_s)
                continue
            if failures:
                log.info("MLflow: %s succeeded after %d failed attempts", what, failures)
            return result


def sqlite_artifact_root(tracking_uri: str) -> str | None:
    """For a `sqlite:///path/mlflow.db` tracking URI (no server), artifacts go to
    `path/artifacts`, where `make mlflow-ui`'s server also finds them."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    return str(db.resolve().parent / "artifacts")


def project_git_commit() -> str | None:
    """The commit the project's code is at (read-only `git rev-parse`), or None outside a git tree."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def make_client(uri: TrackingUri):
    """An MLflow client for `uri`; an http(s) URI's credentials reach MLflow through its own
    environment variables (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), not the URL."""
    configure_http()
    os.environ.update(uri.env)
    # MLflow also reads this variable itself (for artifact URLs): it gets the URI without secrets.
    os.environ["MLFLOW_TRACKING_URI"] = uri.client_uri
    from mlflow import MlflowClient

    return MlflowClient(uri.client_uri)


class MlflowRun:
    """One MLflow run, as the sidecar uses it."""

    def __init__(self, client, run_id: str, backoff: Backoff) -> None:
        self.client = client
        self.run_id = run_id
        self.backoff = backoff

    @classmethod
    def open(
        cls,
        client,
        run_file: RunFile,
        entry: RunEntry,
        run_dir: Path,
        uri: TrackingUri,
        experiment: str | None,
        backoff: Backoff,
    ) -> MlflowRun:
        """The MLflow run of one segment of the file (`entry` of mlflow_run.json, saved before
        this is called), created on first use; waits (with backoff) while MLflow is unreachable."""
        run_id = backoff.call("finding the run", lambda: cls._find_run(client, run_file, entry, uri.display))
        if run_id is None:
            name = experiment or run_file.experiment or DEFAULT_EXPERIMENT
            run_id = backoff.call(
                "creating the run",
                lambda: cls._create_run(client, run_dir, entry.run_key, name, uri.client_uri),
            )
            log.info("MLflow: created run %s in experiment %r at %s", run_id, name, uri.display)
        else:
            name = None
            log.info("MLflow: continuing run %s at %s", run_id, uri.display)
        run_file.set_run(entry, run_id, uri.display, name)
        return cls(client, run_id, backoff)

    @staticmethod
    def _find_run(client, run_file: RunFile, entry: RunEntry, display_uri: str) -> str | None:
        from mlflow.exceptions import MlflowException

        # Compared redacted: older files hold the URI as given, credentials rotate.
        if entry.run_id and redact_uri(run_file.tracking_uri or "") == display_uri:
            try:
                client.get_run(entry.run_id)
                return entry.run_id
            except MlflowException as exc:
                if exc.get_http_status_code() != 404:
                    raise
                log.warning(
                    "MLflow: run %s (from %s) is not at %s; looking it up by its key",
                    entry.run_id,
                    RUN_FILE,
                    display_uri,
                )
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = (
            client.search_runs(
                experiments, filter_string=f"tags.{RUN_KEY_TAG} = '{entry.run_key}'", max_results=1
            )
            if experiments
            else []
        )
        return found[0].info.run_id if found else None

    @staticmethod
    def _create_run(client, run_dir: Path, run_key: str, name: str, tracking_uri: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    name, artifact_location=sqlite_artifact_root(tracking_uri)
                )
            except MlflowException:  # created meanwhile by another sidecar
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        # Looked up again right before creating: a previous attempt may have created it and then
        # lost the reply (server restart).
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.{RUN_KEY_TAG} = '{run_key}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        tags = {RUN_KEY_TAG: run_key, "run_dir": str(run_dir.resolve())}
        return client.create_run(experiment_id, run_name=run_dir.resolve().name, tags=tags).info.run_id

    def state(self) -> tuple[dict[str, int], dict[str, str]]:
        """The last step forwarded per record kind (-1: none) and the run's params."""
        run = self.backoff.call("reading the run", lambda: self.client.get_run(self.run_id))
        metrics = run.data.metrics
        last = {kind: int(metrics[key]) if key in metrics else -1 for kind, key in STEP_KEYS.items()}
        return last, dict(run.data.params)

    def log_batch(self, metrics: list, params: list, tags: list) -> None:
        self.backoff.call(
            "log_batch",
            lambda: self.client.log_batch(
                self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True
            ),
        )

    def has_artifact(self, name: str) -> bool:
        files = self.backoff.call("listing artifacts", lambda: self.client.list_artifacts(self.run_id))
        return any(f.path == name for f in files)

    def log_artifact(self, path: Path, scrub: Callable[[str], str] = lambda text: text) -> None:
        """Uploads the file; a text file with credentials in it goes as a redacted copy."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            clean = scrub(text)
            with tempfile.TemporaryDirectory() as tmp:
                upload = path
                if clean != text:
                    upload = Path(tmp) / path.name
                    upload.write_text(clean, encoding="utf-8")
                self.backoff.call(
                    f"uploading {path.name}", lambda: self.client.log_artifact(self.run_id, str(upload))
                )
        except Aborted:
            raise
        except Exception as exc:  # an artifact store we cannot write to must not stop the metrics
            log.warning(
                "MLflow: could not upload %s as an artifact (%s: %s); metrics continue",
                path,
                type(exc).__name__,
                exc,
            )

    def set_status(self, status: str) -> None:
        try:
            self.backoff.call(
                f"setting status {status}", lambda: self.client.update_run(self.run_id, status=status)
            )
        except Exception as exc:  # a status MLflow refuses (a deleted run) must not stop the metrics
            if not is_refused(exc):
                raise
            log.warning("MLflow: could not set run %s to %s (%s)", self.run_id, status, describe(exc))
