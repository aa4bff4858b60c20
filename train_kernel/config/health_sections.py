"""Sections of ours about a run's health (`health = dict(...)`) and about faults injected on
purpose (`fault_injection = dict(...)`, for tests and drills). Read by train_kernel.health."""

from __future__ import annotations

from dataclasses import dataclass

from train_kernel.config.errors import ConfigError
from train_kernel.config.typecheck import Section


def _at_least(section: Section, names: tuple[str, ...], low: float) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < low:
            raise ConfigError(f"must be >= {low}, got {value}", key=name)


@dataclass(frozen=True)
class LossSpikeConfig(Section):
    """`health.loss_spike = dict(...)`: the loss above `factor` x the median of the last `window`
    steps' losses for `steps` consecutive steps is a spike (alert, then rollback)."""

    factor: float = 2.0
    """How far above the running median a loss must be (> 1)."""
    window: int = 50
    """Steps in the running median; no spike is judged before the window is full."""
    steps: int = 3
    """Consecutive spiking steps that make a spike."""

    def check(self) -> None:
        if self.factor <= 1:
            raise ConfigError(f"must be > 1, got {self.factor}", key="factor")
        _at_least(self, ("window", "steps"), 1)


@dataclass(frozen=True)
class HealthConfig(Section):
    """`health = dict(...)` (ours): what the trainer does about trouble nobody is watching."""

    max_consecutive_skips: int = 20
    """Consecutive optimizer steps skipped for inf/nan gradients that trigger a rollback to the last
    complete checkpoint (0 = never; the fp16 loss scaler's usual skips are a few in a row)."""
    loss_spike: LossSpikeConfig | None = None
    """Loss-spike detection (dict(factor, window, steps)); None = off. A spike triggers a rollback."""
    max_rollbacks: int = 3
    """Rollbacks allowed over the whole run folder (restarts included); one more is an error."""
    hang_timeout_s: float | None = None
    """No step progress on a rank for this long: every rank writes its stacks into
    <run_dir>/health/, a `hang` alert goes out and the job exits with code 124. None = off. Must
    cover the slowest step, validation pass and synchronous checkpoint save."""
    hang_exit_grace_s: float = 60.0
    """After hang_timeout_s plus this, faulthandler's watchdog (which needs no GIL) dumps the
    stacks and exits even if the Python watchdog could not run."""
    profiling: bool = False
    """Torch profiler trace of profile_steps and a per-step memory summary into <run_dir>/profile/
    (`train-kernel run --profiling` sets it)."""
    profile_steps: tuple[int, int] = (2, 4)
    """First and last step (inclusive) of the profiler trace."""
    alert_format: str = "feishu"
    """Body of the monitor.alert webhook POSTs: "feishu" (Feishu bot message, InternLM's) or
    "json" (the alert as a plain JSON object)."""
    alert_attempts: int = 3
    """Attempts per alert / heartbeat (with backoff) before it is given up and logged."""
    alert_timeout_s: float = 5.0
    """HTTP timeout of one attempt."""
    heartbeat_every: int = 1
    """Steps between light-monitor heartbeats (monitor.alert.light_monitor_address)."""

    def check(self) -> None:
        _at_least(self, ("max_consecutive_skips", "max_rollbacks"), 0)
        _at_least(self, ("alert_attempts", "heartbeat_every"), 1)
        _at_least(self, ("hang_exit_grace_s",), 0)
        for name in ("hang_timeout_s", "alert_timeout_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"must be > 0, got {value}", key=name)
        first, last = self.profile_steps
        if not 0 <= first <= last:
            raise ConfigError(
                f"must be (first, last) with 0 <= first <= last, got {self.profile_steps}",
                key="profile_steps",
            )
        if self.alert_format not in ("feishu", "json"):
            raise ConfigError(f"{self.alert_format!r} is not 'feishu' or 'json'", key="alert_format")


@dataclass(frozen=True)
class FaultInjectionConfig(Section):
    """`fault_injection = dict(...)` (ours, as Megatron's error injection): faults on purpose, each
    once at the step named. Off by default; a run with any of them logs it loudly at start."""

    nonfinite_grad_at_steps: tuple[int, ...] = ()
    """Steps whose gradients are made non-finite (NaN) on every rank."""
    loss_spike_at_steps: tuple[int, ...] = ()
    """Steps whose loss, as the health checks see it, is multiplied by 100."""
    hang_at_step: int | None = None
    """Step at which rank hang_rank stops forever (before the step's work)."""
    hang_rank: int = 0
    """The rank that hangs at hang_at_step."""
    raise_at_step: int | None = None
    """Step at which every rank raises an exception (a crash)."""

    def check(self) -> None:
        for name in ("nonfinite_grad_at_steps", "loss_spike_at_steps"):
            if any(step < 0 for step in getattr(self, name)):
                raise ConfigError(f"steps must be >= 0, got {getattr(self, name)}", key=name)
        _at_least(self, ("hang_at_step", "hang_rank", "raise_at_step"), 0)
