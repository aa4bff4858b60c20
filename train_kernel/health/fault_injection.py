"""Faults on purpose, for tests and drills (as Megatron's error injection): non-finite gradients,
a loss spike, a hung rank, an exception, each at a chosen step and each once per trainer process
(a rollback that replays the step does not fire it again). Off unless `fault_injection` is set;
when it is, the start of the run says so loudly."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

# A spiked loss is the true loss times this (far above any sensible health.loss_spike.factor).
SPIKE_FACTOR = 100.0


class InjectedFault(RuntimeError):
    """The exception of fault_injection.raise_at_step."""


class FaultInjector:
    def __init__(
        self,
        rank: int,
        nonfinite_grad_at_steps: Iterable[int] = (),
        loss_spike_at_steps: Iterable[int] = (),
        hang_at_step: int | None = None,
        hang_rank: int = 0,
        raise_at_step: int | None = None,
    ) -> None:
        self.rank = rank
        self.nonfinite = set(nonfinite_grad_at_steps)
        self.spikes = set(loss_spike_at_steps)
        self.hang_at = hang_at_step if hang_rank == rank else None
        self.hang_described = (hang_at_step, hang_rank)
        self.raise_at = raise_at_step

    @classmethod
    def from_config(cls, section, rank: int) -> FaultInjector:
        return cls(
            rank,
            section.nonfinite_grad_at_steps,
            section.loss_spike_at_steps,
            section.hang_at_step,
            section.hang_rank,
            section.raise_at_step,
        )

    @property
    def active(self) -> bool:
        return bool(
            self.nonfinite or self.spikes or self.hang_described[0] is not None or self.raise_at is not None
        )

    def announce(self) -> None:
        """The loud start-up line: a drill must never be mistaken for a real run's trouble."""
        if not self.active:
            return
        parts = []
        if self.nonfinite:
            parts.append(f"non-finite gradients at steps {sorted(self.nonfinite)}")
        if self.spikes:
            parts.append(f"loss x{SPIKE_FACTOR:g} at steps {sorted(self.spikes)}")
        if self.hang_described[0] is not None:
            parts.append(f"rank {self.hang_described[1]} hangs at step {self.hang_described[0]}")
        if self.raise_at is not None:
            parts.append(f"an exception at step {self.raise_at}")
        log.warning("!" * 20 + " FAULT INJECTION ON: %s " + "!" * 20, "; ".join(parts))

    def nonfinite_grad(self, step: int) -> bool:
        """True once for each listed step: this step's gradients are to be made non-finite."""
        if step in self.nonfinite:
            self.nonfinite.discard(step)
            log.warning("FAULT INJECTION: non-finite gradients at step %d", step)
            return True
        return False

    def spike(self, step: int, loss: float) -> float:
        """The loss the health checks see: spiked once at each listed step."""
        if step in self.spikes:
            self.spikes.discard(step)
            log.warning("FAULT INJECTION: loss spike at step %d (%g -> %g)", step, loss, loss * SPIKE_FACTOR)
            return loss * SPIKE_FACTOR
        return loss

    def before_step(self, step: int) -> None:
        """Hangs this rank forever, or raises, when the step is the one listed."""
        if self.raise_at is not None and step == self.raise_at:
            self.raise_at = None
            raise InjectedFault(f"fault injection: raise_at_step={step}")
        if self.hang_at is not None and step == self.hang_at:
            self.hang_at = None
            log.warning("FAULT INJECTION: rank %d hangs at step %d", self.rank, step)
            while True:
                time.sleep(3600)
