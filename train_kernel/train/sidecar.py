"""Supervision of rank 0's metrics sidecar (metrics/supervisor.py), which tails metrics.jsonl and
forwards it to MLflow, so training never waits on MLflow: started when the config names a tracking
URI, started again if it exits, drained at the end. Monitoring must not stop a training run: when
the sidecar cannot run, every record is still in metrics.jsonl and the log says how to forward it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metrics.supervisor import SidecarProcess
    from train_kernel.config.sections import MetricsConfig

log = logging.getLogger(__name__)


class MetricsSidecar:
    def __init__(self, *, process: SidecarProcess) -> None:
        self.process = process

    @classmethod
    def start(cls, *, metrics: MetricsConfig, run_dir: Path) -> MetricsSidecar | None:
        """The sidecar for `run_dir`, or None when no tracking URI is configured or it cannot start."""
        uri = metrics.mlflow_tracking_uri
        if not uri:
            return None
        # Imported here: the sidecar's packages (mlflow's client) are an optional extra.
        from metrics.redact import redact_uri
        from metrics.supervisor import start_sidecar

        shown = redact_uri(uri)  # a password or token in the URI never reaches the log
        try:
            process = start_sidecar(run_dir, uri, metrics.experiment)
        except (ModuleNotFoundError, OSError) as error:
            log.warning(
                "metrics: no MLflow sidecar (%s); the records stay in %s, forward them later with "
                "`MLFLOW_TRACKING_URI=%s metrics-sidecar run --run-dir %s --once`",
                error,
                run_dir / "metrics.jsonl",
                shown,
                run_dir,
            )
            return None
        log.info(
            "metrics: sidecar pid %d forwards %s to MLflow at %s",
            process.pid,
            run_dir / "metrics.jsonl",
            shown,
        )
        return cls(process=process)

    def keep_alive(self) -> None:
        """Starts the sidecar again if it has exited (at most every half minute)."""
        if self.process.restart_if_exited():
            log.warning("metrics: the sidecar had exited (see %s); started it again", self.process.log_file)

    def drain(self) -> None:
        """Waits (bounded) for the sidecar to forward the last records, then stops it."""
        log.info("metrics: waiting for the sidecar to forward the last records to MLflow")
        self.process.restart_if_exited(min_interval_s=0)  # one that died still gets to drain
        code = self.process.stop(timeout_s=120)
        if code != 0:
            log.warning(
                "metrics sidecar exited with %s; see %s (rerun `metrics-sidecar run --once` "
                "on this run folder to forward what is left)",
                code,
                self.process.log_file,
            )
