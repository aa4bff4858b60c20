"""What a run reports besides checkpoints: the log line of each step and of each validation, the
records of metrics.jsonl (rank 0 alone writes them, with the run's parameters and config.py at
start), and rank 0's metrics sidecar that forwards them to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from metrics.emitter import MetricsEmitter
from train_kernel.config import TrainConfig
from train_kernel.parallel.process_groups import ParallelContext
from train_kernel.train.log_line import format_log_line
from train_kernel.train.sidecar import MetricsSidecar

log = logging.getLogger(__name__)


class Emitter(Protocol):
    def emit(self, kind: str, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _NoEmitter:
    """What ranks other than 0 emit to: nothing (rank 0 alone writes metrics.jsonl)."""

    def emit(self, kind: str, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class RunOutput:
    def __init__(self, *, emitter: Emitter, sidecar: MetricsSidecar | None) -> None:
        self.emitter = emitter
        self.sidecar = sidecar

    @classmethod
    def open(cls, *, config: TrainConfig, parallel: ParallelContext, run_dir: Path, step: int) -> RunOutput:
        """Starts the run's records at `step` (0, or the step a resume continues from): the params
        record, config.py and the sidecar on rank 0."""
        if not parallel.is_logging_rank:
            return cls(emitter=_NoEmitter(), sidecar=None)
        emitter = MetricsEmitter(run_dir)
        (run_dir / "config.py").write_text(config.source_text, encoding="utf-8")
        tags = {
            "job_name": config.job_name,
            "world_size": parallel.world_size,
            "parallel": parallel.layout.describe(),
        }
        emitter.emit("params", {"params": config.to_json(), "tags": tags, "step": step})
        return cls(emitter=emitter, sidecar=MetricsSidecar.start(metrics=config.metrics, run_dir=run_dir))

    def train_step(self, record: dict[str, Any]) -> None:
        log.info(format_log_line(record))
        self.emitter.emit("train", record)
        if self.sidecar is not None:
            self.sidecar.keep_alive()

    def validation(self, name: str, record: dict[str, Any]) -> None:
        """The record of validation set `name` ("" for a pack-stage folder's valid split)."""
        log.info((f"Validation on {name}: " if name else "validation: ") + format_log_line(record))
        self.emitter.emit("valid", record)

    def close(self) -> None:
        self.emitter.close()
        if self.sidecar is not None:
            self.sidecar.drain()
