"""Public API for the trainer: start the sidecar beside rank 0 and stop it at the end.

    sidecar = start_sidecar(run_dir, tracking_uri, experiment)
    ...  # training; MetricsEmitter appends to run_dir/metrics.jsonl
    sidecar.stop()  # forwards what the file holds, then exits

The sidecar is a child process (`python -m metrics.sidecar run ... --follow`): the trainer never
waits on MLflow. If the trainer dies, the kernel (Linux) sends the sidecar SIGTERM and it drains
the file and exits (the signal comes when the thread that started it ends: start it from the
main thread); the sidecar also notices within one poll that its parent is gone.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SIDECAR_LOG = "sidecar.log"


class SidecarProcess:
    """A running sidecar."""

    def __init__(
        self,
        process: subprocess.Popen,
        log_file: Path,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.process = process
        self.log_file = log_file
        self.args = args  # how to start it again
        self.env = env
        self.restarts = 0
        self._last_restart = float("-inf")  # the first restart may come at once

    def restart_if_exited(self, min_interval_s: float = 30.0) -> bool:
        """Starts the sidecar again when it has exited on its own (a crash, the OOM killer): it
        resumes exactly where MLflow's data ends. At most once per `min_interval_s`, so a sidecar
        that cannot start is not retried every step. Returns True when it restarted it."""
        if self.args is None or self.process.poll() is None:
            return False
        if time.monotonic() - self._last_restart < min_interval_s:
            return False
        self.process = _spawn(self.args, self.log_file, self.env)
        self._last_restart = time.monotonic()
        self.restarts += 1
        return True

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.process.poll()

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (the sidecar forwards what the file holds, then exits 0); SIGKILL after
        `timeout_s` (what was not forwarded is forwarded by the next sidecar of this run folder).
        Returns the exit code (negative: killed by that signal)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_sidecar(
    run_dir: Path, tracking_uri: str, experiment: str | None = None, log_file: Path | None = None
) -> SidecarProcess:
    """Starts a sidecar forwarding `run_dir/metrics.jsonl` to MLflow at `tracking_uri`; its output
    is appended to `log_file` (default: `run_dir/sidecar.log`). The URI goes to the sidecar in
    its environment (MLFLOW_TRACKING_URI), not on its command line, which any user of the host
    can read: it may hold credentials."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run folder {run_dir} does not exist: create it before starting the metrics sidecar"
        )
    if importlib.util.find_spec("mlflow") is None:
        raise ModuleNotFoundError(
            "the metrics sidecar needs mlflow: pip install -e '.[metrics]' (make install does)"
        )
    log_file = Path(log_file) if log_file is not None else run_dir / SIDECAR_LOG
    args = [
        sys.executable,
        "-m",
        "metrics.sidecar",
        "run",
        "--run-dir",
        str(run_dir),
        "--follow",
        "--parent-pid",
        str(os.getpid()),
    ]
    if experiment is not None:
        args += ["--experiment", experiment]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return SidecarProcess(_spawn(args, log_file, env), log_file, args, env)


# Blocked across the spawn: the child inherits the mask and unblocks these once its handler (forward
# what the file holds, then exit 0) is in place, so a stop that comes while it is still starting
# (a run with nothing left to train stops it at once) is held, not fatal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _spawn(args: list[str], log_file: Path, env: dict[str, str] | None) -> subprocess.Popen:
    masking = hasattr(signal, "pthread_sigmask")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if masking else None
    try:
        with open(log_file, "ab") as log:
            return subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
    finally:
        if masking:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
