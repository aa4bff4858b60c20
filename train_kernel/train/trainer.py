"""One rank's training run, top to bottom: process groups, the run folder and its log, the parts
built from the config (train/builder.py), the checkpoint resumed, then the loop (train/loop.py)
until the last step or a stop; everything it started is closed however it ends."""

from __future__ import annotations

from pathlib import Path

from train_kernel.backend_flags import apply_backend_flags
from train_kernel.config import TrainConfig
from train_kernel.health.alerts import AlertSender
from train_kernel.health.profiling import oom_snapshot
from train_kernel.health.run_health import RunHealth, crash_summary, open_alerts
from train_kernel.parallel.process_groups import ParallelContext, init_parallel
from train_kernel.train.builder import build_run
from train_kernel.train.loop import TrainLoop
from train_kernel.train.run_folder import setup_logging
from train_kernel.train.run_output import RunOutput
from train_kernel.train.stop_request import StopRequest
from train_kernel.train.train_state import TrainState

__all__ = ["TrainState", "train"]  # TrainState: what checkpoint tests and benchmarks build a RunState with


def train(config: TrainConfig) -> None:
    """Trains `config` as this process's rank (RANK / WORLD_SIZE from the launcher; one process
    without them). Process groups are torn down however the run ends."""
    parallel = init_parallel(config.parallel)
    alerts = open_alerts(config, parallel)  # monitor.alert: start, finish, crash, rollback, hang
    finished = False
    try:
        with oom_snapshot(config.run_dir, parallel.rank, enabled=config.health.profiling):
            _train(config, parallel, alerts)
        finished = True
    except Exception as error:
        alerts.alert("crash", crash_summary(error))
        raise
    finally:
        alerts.close(timeout_s=config.health.alert_timeout_s * config.health.alert_attempts)
        parallel.close(barrier=finished)


def _train(config: TrainConfig, parallel: ParallelContext, alerts: AlertSender) -> None:
    run_dir = Path(config.run_dir)  # the config fills runs/<JOB_NAME> when none is given
    setup_logging(run_dir, parallel.rank)
    apply_backend_flags(config)  # before resolve_dtype: "torch.tf32" resolves to float32
    run = build_run(config, parallel=parallel, run_dir=run_dir)
    try:
        run.checkpoints.check_storage()
        run.checkpoints.resume(run.checkpoint_state)
        output = RunOutput.open(
            config=run.config, parallel=parallel, run_dir=run_dir, step=run.counters.batch_count
        )
        try:
            with StopRequest() as stop, RunHealth.start(run=run, output=output, alerts=alerts) as health:
                TrainLoop(run=run, output=output, stop=stop, health=health).run_to_end()
        finally:
            output.close()
    finally:
        run.checkpoints.close()
    if stop.signal is not None:
        raise SystemExit(128 + stop.signal)
