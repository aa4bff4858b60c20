"""The health checks of one rank's training loop, in one object the loop calls at three points:
`before_step` (watchdog beat, injected faults, profiler), `loss_scale` (injected non-finite
gradients) and `after_step` (skip streak, loss spike, rollback, heartbeat, stragglers, profiler).

Every decision that changes what the ranks do next is taken from figures that are already the
same on every rank (the job's loss, the optimizer's global skip decision), so the ranks roll back
together without a further collective.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from train_kernel.checkpoint import world
from train_kernel.health.alerts import FEISHU, AlertSender
from train_kernel.health.fault_injection import FaultInjector
from train_kernel.health.profiling import StepProfiler
from train_kernel.health.rollback import RECORD, RollbackLimitError, RollbackRecord, limit_error
from train_kernel.health.spikes import LossSpikeDetector, SkipStreak
from train_kernel.health.stragglers import describe, find_stragglers, gather_step_times
from train_kernel.health.watchdog import HangWatchdog

if TYPE_CHECKING:
    from train_kernel.config import TrainConfig
    from train_kernel.parallel.process_groups import ParallelContext
    from train_kernel.train.builder import BuiltRun
    from train_kernel.train.run_output import RunOutput

log = logging.getLogger(__name__)


def _url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def open_alerts(config: TrainConfig, parallel: ParallelContext) -> AlertSender:
    """The run's alert sender from `monitor.alert` (and InternLM's older `alert_address`): rank 0
    sends (one message per event for the job); the other ranks' senders only log. A crash of
    another rank reaches rank 0 as a failed collective, or as a hang with health.hang_timeout_s."""
    alert, health = config.monitor.alert, config.health
    webhook = (alert.feishu_alert_address if alert.enable_feishu_alert else None) or config.alert_address
    rank0 = parallel.rank == 0
    sender = AlertSender(
        config.job_name,
        rank=parallel.rank,
        webhook=webhook if rank0 else None,
        webhook_format=health.alert_format,
        heartbeat_url=_url(alert.light_monitor_address) if rank0 and alert.light_monitor_address else None,
        alert_file=alert.alert_file_path if rank0 else None,
        attempts=health.alert_attempts,
        timeout_s=health.alert_timeout_s,
        log_level=logging.WARNING if rank0 else logging.DEBUG,
    )
    if rank0 and sender.enabled:
        log.info(
            "alerts: %s%s%s",
            f"webhook ({'Feishu' if health.alert_format == FEISHU else 'plain JSON'}) " if webhook else "",
            "light-monitor heartbeats " if sender.heartbeat_url else "",
            f"file {sender.alert_file}" if sender.alert_file else "",
        )
    return sender


def crash_summary(error: BaseException) -> str:
    """The exception and the last frames of its traceback (InternLM sends its last 10 lines)."""
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return "".join(lines)[-2000:]


class RunHealth:
    def __init__(self, *, run: BuiltRun, output: RunOutput, alerts: AlertSender) -> None:
        self.run, self.output, self.alerts = run, output, alerts
        config, parallel = run.config, run.parallel
        self.health = config.health
        self.rank = parallel.rank
        self.skips = SkipStreak(self.health.max_consecutive_skips)
        spike = self.health.loss_spike
        self.spikes = LossSpikeDetector(spike.factor, spike.window, spike.steps) if spike else None
        self.faults = FaultInjector.from_config(config.fault_injection, parallel.rank)
        hang_rank = config.fault_injection.hang_rank
        if config.fault_injection.hang_at_step is not None and hang_rank >= parallel.world_size:
            raise ValueError(
                f"fault_injection.hang_rank = {hang_rank}: the job has {parallel.world_size} ranks"
            )
        self.record = RollbackRecord(run.run_dir) if self.rank == 0 else None
        self.rollbacks = world.broadcast_from_zero(
            [vars(r) for r in self.record.rollbacks] if self.record is not None else None
        )
        self.diag_every = config.data.empty_cache_and_diag_interval
        self.watchdog: HangWatchdog | None = None
        self.profiler: StepProfiler | None = None

    @classmethod
    def start(cls, *, run: BuiltRun, output: RunOutput, alerts: AlertSender) -> RunHealth:
        """After the resume: skips the data windows of earlier rollbacks, starts the watchdog and
        the profiler, says what is on, sends the start alert."""
        health = cls(run=run, output=output, alerts=alerts)
        sampler = run.data.sampler
        windows = [(r["first_batch"], r["end_batch"]) for r in health.rollbacks]
        if windows:
            skipped = frozenset(i for first, end in windows for i in range(first, end))
            sampler.skip_batches = sampler.skip_batches | skipped
            log.info(
                "health: %d earlier rollback(s) of this run (%s): skipping their %d batches",
                len(windows),
                run.run_dir / "health" / "rollbacks.json",
                len(skipped),
            )
        health.faults.announce()
        if health.health.hang_timeout_s is not None:
            health.watchdog = HangWatchdog(
                health.health.hang_timeout_s,
                run.run_dir,
                run.parallel.rank,
                on_hang=health._on_hang,
                grace_s=health.health.hang_exit_grace_s,
            )
        if health.health.profiling:
            first, last = health.health.profile_steps
            health.profiler = StepProfiler(run.run_dir, run.parallel.rank, run.device, first, last)
        step = run.counters.batch_count
        alerts.alert(
            "start",
            f"training {'resumed at' if step else 'started at'} step {step} of {run.config.data.total_steps} "
            f"on {run.parallel.world_size} rank(s)",
            step=step,
        )
        return health

    def __enter__(self) -> RunHealth:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        if self.profiler is not None:  # an out-of-memory snapshot: profiling.oom_snapshot, around the run
            self.profiler.close()
        if error is None:
            state = self.run.counters
            self.alerts.alert(
                "finish",
                f"training ended at step {state.batch_count} of {self.run.config.data.total_steps} "
                f"({state.inf_nan_skip_batches} steps skipped for inf/nan, "
                f"{len(self.rollbacks)} rollback(s))",
                step=state.batch_count,
            )

    # -- the loop's hooks ---------------------------------------------------------------------

    def before_step(self, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(step)
        self.faults.before_step(step)
        if self.profiler is not None:
            self.profiler.start(step)

    def loss_scale(self, step: int, scale: float) -> float:
        """The scale the step's backward uses: NaN when a fault makes this step's gradients non-finite."""
        return float("nan") if self.faults.nonfinite_grad(step) else scale

    def after_step(self, record: dict[str, Any], updated: bool, seconds: float) -> bool:
        """After step `record["step"]` (counters already advanced). True when it rolled back to a
        checkpoint (the counters, model and sampler are then the checkpoint's)."""
        step = int(record["step"])
        if self.profiler is not None:
            self.profiler.end(step)
        if self.rank == 0 and self.alerts.heartbeat_url and step % self.health.heartbeat_every == 0:
            self.alerts.heartbeat(record)
        if self.diag_every and (step + 1) % self.diag_every == 0:
            self._diagnose(step, seconds)
        trouble = self._trouble(step, float(record["loss"]), updated)
        if trouble is None:
            return False
        self._roll_back(step, *trouble)
        return True

    # -- decisions ---------------------------------------------------------------------------

    def _trouble(self, step: int, loss: float, updated: bool) -> tuple[str, int] | None:
        """Why the run must roll back after `step`, and the step where that trouble began."""
        loss = self.faults.spike(step, loss)
        if self.skips.update(not updated):
            limit = self.health.max_consecutive_skips
            reason = f"{limit} consecutive steps skipped for inf/nan gradients"
            self.alerts.alert("nonfinite_streak", f"step {step}: {reason}", step=step)
            return reason, step - limit + 1
        spike = self.spikes.update(loss) if self.spikes is not None else None
        if spike is None:
            return None
        reason = f"loss spike: {spike.describe()}"
        self.alerts.alert(
            "loss_spike", f"step {step}: {reason}", step=step, loss=spike.loss, median=spike.median
        )
        return reason, step - spike.steps + 1

    def _roll_back(self, step: int, reason: str, since: int) -> None:
        """Reloads the newest complete checkpoint from before the trouble began (a checkpoint of
        step N holds steps 0..N-1) and skips the batches drawn since it; at most
        health.max_rollbacks times over the run."""
        limit = self.health.max_rollbacks
        if len(self.rollbacks) >= limit:
            raise limit_error(len(self.rollbacks), limit, reason, step, self.run.run_dir / RECORD)
        run, sampler = self.run, self.run.data.sampler
        end_batch = sampler.batches_drawn
        run.optim.optimizer.wait_params()  # no parameter broadcast in flight while weights are replaced
        uri = run.checkpoints.reload_latest(run.checkpoint_state, at_most_step=since)
        if uri is None:
            raise RollbackLimitError(
                f"step {step}: {reason}; no complete checkpoint at or before step {since} in "
                f"{run.config.ckpt.save_ckpt_folder} to roll back to (ckpt.enable_save_ckpt, "
                "ckpt.checkpoint_every, ckpt.oss_snapshot_freq)"
            )
        first_batch = sampler.batches_drawn
        to_step = run.counters.batch_count
        sampler.skip_batches = sampler.skip_batches | frozenset(range(first_batch, end_batch))
        self.skips.count = 0
        if self.spikes is not None:
            self.spikes.reset_streak()
        number = len(self.rollbacks) + 1
        if self.record is not None:
            rollback = self.record.add(reason, step, to_step, uri, first_batch, end_batch)
            self.rollbacks.append(vars(rollback))
        else:
            self.rollbacks.append({"first_batch": first_batch, "end_batch": end_batch})
        message = (
            f"rollback {number} of at most {limit} at step {step}: {reason}; reloaded {uri} "
            f"(step {to_step}); sampler batches {first_batch}..{end_batch - 1} skipped from now on"
        )
        log.warning("%s", message)
        self.output.emitter.emit(
            "event",
            {
                "step": step,
                "event": "rollback",
                "reason": reason,
                "checkpoint": uri,
                "rollback": {
                    "number": number,
                    "to_step": to_step,
                    "skipped_batches": end_batch - first_batch,
                },
            },
        )
        self.alerts.alert("rollback", message, step=step, checkpoint=uri)

    def _diagnose(self, step: int, seconds: float) -> None:
        """InternLM's empty_cache_and_diag_interval: free the allocator's cache, name slow ranks."""
        if self.run.device.type == "cuda":
            torch.cuda.empty_cache()
        parallel = self.run.parallel
        times = gather_step_times(seconds, parallel.distributed, self.run.device)
        if self.rank != 0 or len(times) < 2:
            return
        ratio = self.run.config.data.diag_outlier_ratio
        slow = find_stragglers(times, ratio)
        shown = (
            ", ".join(f"{t:.3f}" for t in times)
            if len(times) <= 64
            else f"min {min(times):.3f}, max {max(times):.3f}"
        )
        log.info("step %d: step time per rank (s): %s", step, shown)
        if slow:
            log.warning("step %d: %s (data.diag_outlier_ratio = %g)", step, describe(times, slow), ratio)

    def _on_hang(self, step: int, seconds: float, stacks: Path) -> None:
        """On the watchdog's thread: the alert, sent before the process exits (bounded wait)."""
        self.alerts.alert(
            "hang",
            f"rank {self.rank}: no step progress for {seconds:.0f} s since step {step} began; "
            f"stacks in {stacks}; exiting so that the job restarts",
            step=step,
        )
        self.alerts.flush(timeout_s=min(15.0, self.health.hang_exit_grace_s))
