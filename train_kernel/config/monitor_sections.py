"""Sections of InternLM's later configs about watching a run: `monitor = dict(alert=..., tensorboard=...)`
and `grad_profiling = dict(...)`. They are accepted so that those configs load unmodified; what is not
done yet is said by a warning naming the key (train_kernel.config.notices), never skipped silently."""

from __future__ import annotations

from dataclasses import dataclass, field

from train_kernel.config.errors import ConfigError
from train_kernel.config.typecheck import Section


@dataclass(frozen=True)
class AlertConfig(Section):
    """`monitor = dict(alert=dict(...))`: InternLM's Feishu alerts and light-monitor heartbeats, sent
    by train_kernel.health.alerts in the background (health.alert_format, alert_attempts,
    alert_timeout_s, heartbeat_every)."""

    enable_feishu_alert: bool = False
    """Send alerts (start, finish, crash, rollback, hang, loss spike, non-finite streak) to
    feishu_alert_address."""
    feishu_alert_address: str | None = None
    """Feishu webhook URL of the alerts."""
    light_monitor_address: str | None = None
    """InternLM's light-monitor server ("host:port" or a URL): each step's metrics are POSTed to it
    as a heartbeat (msg_type "train_metrics")."""
    alert_file_path: str | None = None
    """File to which every alert is appended (one JSON object a line), webhook or not."""


@dataclass(frozen=True)
class TensorboardConfig(Section):
    """`monitor = dict(tensorboard=dict(...))`: InternLM's TensorBoard writer. There is no TensorBoard
    writer here: metrics go to runs/<JOB_NAME>/metrics.jsonl and, through the sidecar, to MLflow."""

    queue_max_length: int = 1
    """Records InternLM's writer buffers before writing (InternLM's default 1)."""

    def check(self) -> None:
        if self.queue_max_length < 1:
            raise ConfigError(f"must be >= 1, got {self.queue_max_length}", key="queue_max_length")


@dataclass(frozen=True)
class MonitorConfig(Section):
    """`monitor = dict(...)`: alerts and the TensorBoard queue (InternLM's defaults when missing)."""

    alert: AlertConfig = field(default_factory=AlertConfig)
    """Feishu alerts, light-monitor heartbeats, the alert file."""
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    """TensorBoard writer settings (no TensorBoard writer here)."""


@dataclass(frozen=True)
class GradProfilingConfig(Section):
    """`grad_profiling = dict(...)`: InternLM's per-layer gradient statistics. Not recorded yet: any
    profiling switched on gets a warning naming it."""

    grad_norm_profiling: bool = False
    """Gradient norm of each layer / parameter."""
    zero_grad_profiling: bool = False
    """Count of zero gradients of each layer / parameter."""
    vocab_grad_norm_profiling: bool = False
    """Gradient norm of each vocabulary row."""
    interval_steps: int = 1
    """Profile every this many steps."""
    layers: tuple[str, ...] = ()
    """Layer names to profile; () = all."""

    def check(self) -> None:
        if self.interval_steps < 1:
            raise ConfigError(f"must be >= 1, got {self.interval_steps}", key="interval_steps")

    @property
    def enabled(self) -> tuple[str, ...]:
        """The profiling switches that are on."""
        names = ("grad_norm_profiling", "zero_grad_profiling", "vocab_grad_norm_profiling")
        return tuple(name for name in names if getattr(self, name))
